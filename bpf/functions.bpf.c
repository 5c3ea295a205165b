/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Function probes of HVO (fentry/fexit or kprobe/kretprobe): vmemmap optimize/restore, the remap
 * workers, demote and the pool alloc/free functions. Included by observer/probes/functions.py,
 * which appends one small wrapper per attached symbol (hvo_fn_* handlers below, called with the
 * arguments as plain integers) and passes the layout as -D defines taken from the kernel's BTF
 * (struct page pointer -> pfn: hvo_page_pfn() of hvo_common.h):
 *
 *   HVO_FN_PRIVATE_OFF    offsetof(struct page, private) (== folio->private of the head page)
 *   HVO_FN_OPT_BIT        HPG_vmemmap_optimized (bit in ->private)
 *   HVO_FN_HORDER_OFF     offsetof(struct hstate, order) (unsigned int)
 *   HVO_FN_FORDER_OFF     offset of the byte holding a folio's order (folio->_folio_order, or the
 *                         low byte of folio->_flags_1)
 *   HVO_FN_LRU_OFF        offsetof(struct folio, lru)
 *   HVO_FN_PAGE_SIZE      PAGE_SIZE
 *   HVO_FN_REMAP_PTE_ADDR / HVO_FN_RESTORE_PTE_ADDR  addresses of vmemmap_remap_pte and
 *                         vmemmap_restore_pte (direction of vmemmap_remap_range), when probed
 *   HVO_FN_REMAP_FREE_PROBED  the optimize-side remap is probed (decides optimize's result)
 *
 * Kernel structs are never read through headers (they may be another version's): only
 * bpf_probe_read_kernel at those offsets. Pointers are handled as integers: fentry arguments are
 * laundered through bpf_probe_read_kernel (hvo_fn_arg) so the verifier sees scalars, not BTF pointers.
 */

#define HVO_FN_SLOT_OPTIMIZE 0
#define HVO_FN_SLOT_RESTORE 1
#define HVO_FN_SLOT_POOL_ALLOC 2
#define HVO_FN_SLOT_POOL_FREE 3
#define HVO_FN_SLOT_DEMOTE 4
#define HVO_FN_SLOT_REMAP 5
#define HVO_FN_DEMOTE_MAX 8	/* folios reported per demote call (1 GiB pages: one is usual) */
#define HVO_FN_ENOMEM 12
#define HVO_FN_DEMOTE_CTX 1
#ifndef HVO_FN_WALK_PTE_OFF
#define HVO_FN_WALK_PTE_OFF 0	/* offsetof(struct vmemmap_remap_walk, remap_pte) */
#endif

/* One call in flight on one task, keyed by (tid << 8 | slot): entry state the exit handler needs. */
struct hvo_fn_pend {
	u64 ts;
	u64 head;	/* struct page * of the head page (folio) */
	u64 aux;	/* demote: the list_head * */
	s32 err;	/* positive errno set by a nested failure (remap, restore) */
	u8 order;
	u8 flag_before;	/* HPG_vmemmap_optimized at entry */
	u8 depth;	/* nested probed calls of the same slot (pool alloc wrappers, optimize) */
	u8 npfn;
	u8 kind;	/* remap: event type; demote: HVO_FN_DEMOTE_CTX for a context-only probe */
	u8 remapped;	/* optimize: a remap_free succeeded inside this call */
	u64 pfn[HVO_FN_DEMOTE_MAX];
};

/* LRU: an entry whose exit was missed (kretprobe maxactive, a dying task) ages out by itself. */
BPF_TABLE("lru_hash", u64, struct hvo_fn_pend, hvo_fn_pending, 4096);

static __always_inline u64 hvo_fn_key(u32 slot)
{
	return ((u64)(u32)bpf_get_current_pid_tgid() << 8) | slot;
}

/* An fentry/fexit argument (or return value) as a plain integer. */
static __always_inline u64 hvo_fn_arg(unsigned long long *ctx, int i)
{
	u64 v = 0;

	bpf_probe_read_kernel(&v, sizeof(v), &ctx[i]);
	return v;
}

static __always_inline u8 hvo_fn_hstate_order(u64 h)
{
	u32 order = 0;

	bpf_probe_read_kernel(&order, sizeof(order), (void *)(h + HVO_FN_HORDER_OFF));
	return order;
}

static __always_inline u8 hvo_fn_folio_order(u64 folio)
{
	u8 order = 0;

	bpf_probe_read_kernel(&order, sizeof(order), (void *)(folio + HVO_FN_FORDER_OFF));
	return order;
}

static __always_inline u8 hvo_fn_optimized(u64 page)
{
	u64 priv = 0;

	bpf_probe_read_kernel(&priv, sizeof(priv), (void *)(page + HVO_FN_PRIVATE_OFF));
	return (priv >> HVO_FN_OPT_BIT) & 1;
}

static __always_inline void hvo_fn_begin(u32 slot, u64 h, u64 head, u64 aux)
{
	u64 key = hvo_fn_key(slot);
	struct hvo_fn_pend p = {};

	p.ts = bpf_ktime_get_ns();
	p.head = head;
	p.aux = aux;
	p.order = h ? hvo_fn_hstate_order(h) : 0;
	p.flag_before = head ? hvo_fn_optimized(head) : 0;
	hvo_fn_pending.update(&key, &p);
}

/* A nested remap that succeeded: the enclosing optimize really optimized its page. */
static __always_inline void hvo_fn_note_remapped(void)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_OPTIMIZE);
	struct hvo_fn_pend *p = hvo_fn_pending.lookup(&key);

	if (p)
		p->remapped = 1;
}

/* A nested failure (remap worker, restore inside a pool free) is recorded on the caller's call. */
static __always_inline void hvo_fn_note_error(u32 slot, s32 err)
{
	u64 key = hvo_fn_key(slot);
	struct hvo_fn_pend *p = hvo_fn_pending.lookup(&key);

	if (p && !p->err)
		p->err = err;
}

static __always_inline void hvo_fn_emit(void *ctx, u8 type, u8 order, u64 pfn, u64 ts, u8 result, s32 err)
{
	struct hvo_event e;

	hvo_event_init(&e, type, order, pfn);
	if (ts)
		e.duration_ns = e.ts_ns - ts;
	e.result = result;
	e.err = err;
	hvo_emit(ctx, &e);
}

/* --- demote seen from its context --------------------------------------------------------- */
/*
 * Kernels that inline the per-page demote function keep only demote_store (sysfs) or
 * demote_pool_huge_page: a vmemmap restore of a page while one of them runs on this task is that
 * page being demoted (restore happens first, then the split). Pages whose vmemmap was never
 * optimized are seen on kernels that call restore for them anyway (<= 6.6), not in 6.7+ batches.
 */
static __always_inline int hvo_fn_demote_ctx_enter(void)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_DEMOTE);
	struct hvo_fn_pend p = {};

	p.ts = bpf_ktime_get_ns();
	p.kind = HVO_FN_DEMOTE_CTX;
	hvo_fn_pending.update(&key, &p);
	return 0;
}

static __always_inline int hvo_fn_demote_ctx_exit(void)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_DEMOTE);

	hvo_fn_pending.delete(&key);
	return 0;
}

static __always_inline void hvo_fn_demote_seen(void *ctx, struct hvo_fn_pend *r, u8 failed, s32 err)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_DEMOTE);
	struct hvo_fn_pend *d = hvo_fn_pending.lookup(&key);

	if (!d || d->kind != HVO_FN_DEMOTE_CTX)
		return;
	hvo_fn_emit(ctx, HVO_DEMOTE, r->order, hvo_page_pfn(r->head), r->ts,
		    failed ? HVO_ERROR : HVO_OK, failed ? err : 0);
}

/* --- optimize ------------------------------------------------------------------------------ */
/*
 * Two nested probes may see one optimization: the single-folio entry point (probed because 7.x
 * builds call the per-folio worker's body through a .part clone from it) and the worker itself
 * (6.12 calls it out of line). The outer call reports; the inner one only passes its error up.
 */
static __always_inline int hvo_fn_optimize_enter(u64 h, u64 head)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_OPTIMIZE);
	struct hvo_fn_pend *p = hvo_fn_pending.lookup(&key);

	if (p && p->head == head) {
		p->depth++;
		return 0;
	}
	hvo_fn_begin(HVO_FN_SLOT_OPTIMIZE, h, head, 0);
	return 0;
}

/*
 * ok: the page was optimized. skipped: the function returned without optimizing (sysctl off,
 * self-hosted vmemmap, odd sizeof(struct page), already optimized). error: ret < 0, or (void
 * functions) a remap worker failed inside this call.
 * With the remap worker probed (HVO_FN_REMAP_FREE_PROBED), "optimized" means a successful remap in
 * this call: the flag alone misleads, as pages demoted on 6.7-6.1x start with a stale
 * HPG_vmemmap_optimized copied from the gigantic head page, which 6.12 optimizes anyway and 7.x skips.
 * Without it: the flag went from clear at entry to set at exit.
 */
static __always_inline int hvo_fn_optimize_exit(void *ctx, s64 ret, int has_ret)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_OPTIMIZE);
	struct hvo_fn_pend *p = hvo_fn_pending.lookup(&key);
	u8 result;
	s32 err = 0;

	if (!p)
		return 0;
	if (p->depth) {
		p->depth--;
		if (has_ret && ret < 0 && !p->err)
			p->err = -ret;
		return 0;
	}
	if (has_ret && ret < 0) {
		result = HVO_ERROR;
		err = -ret;
	} else if (p->remapped) {
		result = HVO_OK;
#ifdef HVO_FN_REMAP_FREE_PROBED
	} else if (p->err) {
		result = HVO_ERROR;
		err = p->err;
	} else {
		result = HVO_SKIPPED;
	}
#else
	} else if (p->flag_before) {
		result = HVO_SKIPPED;
	} else if (hvo_fn_optimized(p->head)) {
		result = HVO_OK;
	} else if (p->err) {
		result = HVO_ERROR;
		err = p->err;
	} else {
		result = HVO_SKIPPED;
	}
#endif
	hvo_fn_emit(ctx, HVO_OPTIMIZE, p->order, hvo_page_pfn(p->head), p->ts, result, err);
	hvo_fn_pending.delete(&key);
	return 0;
}

/* --- restore ------------------------------------------------------------------------------- */
static __always_inline int hvo_fn_restore_enter(u64 h, u64 head)
{
	hvo_fn_begin(HVO_FN_SLOT_RESTORE, h, head, 0);
	return 0;
}

/* error: ret < 0 (-ENOMEM: no memory for the vmemmap). skipped: the page was not optimized. */
static __always_inline int hvo_fn_restore_exit(void *ctx, s64 ret)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_RESTORE);
	struct hvo_fn_pend *p = hvo_fn_pending.lookup(&key);
	u8 result = HVO_OK;
	s32 err = 0;

	if (!p)
		return 0;
	if (ret < 0) {
		result = HVO_ERROR;
		err = -ret;
		hvo_fn_note_error(HVO_FN_SLOT_POOL_FREE, err);
	} else if (!p->flag_before) {
		result = HVO_SKIPPED;
	}
	hvo_fn_emit(ctx, HVO_RESTORE, p->order, hvo_page_pfn(p->head), p->ts, result, err);
	hvo_fn_demote_seen(ctx, p, result == HVO_ERROR, err);
	hvo_fn_pending.delete(&key);
	return 0;
}

/* --- remap workers ------------------------------------------------------------------------- */
/*
 * Dedicated workers (vmemmap_remap_free/alloc) or the common walker vmemmap_remap_range, whose
 * direction is its walk->remap_pte (vmemmap_remap_pte: free, vmemmap_restore_pte: alloc; anything
 * else, e.g. a PMD split, is not a remap). The range [start, end) is the huge page's vmemmap, less
 * the kept head page in some versions: order = ceil(log2(struct pages)), head = end - 2^order pages.
 */
static __always_inline int hvo_fn_remap_enter(u8 type, u64 start, u64 end)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_REMAP);
	struct hvo_fn_pend p = {};
	u64 n = end > start ? (end - start) / HVO_SPAGE : 0;
	u32 order = n > 1 ? hvo_log2(n - 1) + 1 : 0;

	p.ts = bpf_ktime_get_ns();
	p.kind = type;
	p.order = order;
	p.head = end - ((u64)HVO_SPAGE << (order & 63));
	hvo_fn_pending.update(&key, &p);
	return 0;
}

/* mask: bit 0 emit remap_free, bit 1 emit remap_alloc (the other may have a dedicated probe). */
static __always_inline int hvo_fn_remap_range_enter(u64 start, u64 end, u64 walk, u32 mask)
{
	u64 fn = 0;

	bpf_probe_read_kernel(&fn, sizeof(fn), (void *)(walk + HVO_FN_WALK_PTE_OFF));
#ifdef HVO_FN_REMAP_PTE_ADDR
	if (fn == HVO_FN_REMAP_PTE_ADDR && (mask & 1))
		return hvo_fn_remap_enter(HVO_REMAP_FREE, start, end);
#endif
#ifdef HVO_FN_RESTORE_PTE_ADDR
	if (fn == HVO_FN_RESTORE_PTE_ADDR && (mask & 2))
		return hvo_fn_remap_enter(HVO_REMAP_ALLOC, start, end);
#endif
	return 0;
}

static __always_inline int hvo_fn_remap_exit(void *ctx, s64 ret)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_REMAP);
	struct hvo_fn_pend *p = hvo_fn_pending.lookup(&key);
	u8 result = HVO_OK;
	s32 err = 0;

	if (!p)
		return 0;
	if (ret < 0) {
		result = HVO_ERROR;
		err = -ret;
		hvo_fn_note_error(p->kind == HVO_REMAP_FREE ? HVO_FN_SLOT_OPTIMIZE : HVO_FN_SLOT_RESTORE, err);
	} else if (p->kind == HVO_REMAP_FREE) {
		hvo_fn_note_remapped();
	}
	hvo_fn_emit(ctx, p->kind, p->order, hvo_page_pfn(p->head), p->ts, result, err);
	hvo_fn_pending.delete(&key);
	return 0;
}

/* --- pool alloc ---------------------------------------------------------------------------- */
/*
 * A wrapper that may call another probed allocator (7.x: alloc_fresh_hugetlb_folio calls
 * only_alloc_fresh_hugetlb_folio) marks itself in flight; the inner one then stays silent, so a page
 * is counted once whichever of them the kernel uses. The order comes from the returned folio.
 */
static __always_inline int hvo_fn_pool_alloc_enter(void)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_POOL_ALLOC);
	struct hvo_fn_pend *p = hvo_fn_pending.lookup(&key);
	struct hvo_fn_pend n = {};

	if (p) {
		p->depth++;
		return 0;
	}
	n.ts = bpf_ktime_get_ns();
	hvo_fn_pending.update(&key, &n);
	return 0;
}

static __always_inline void hvo_fn_pool_alloc_emit(void *ctx, u64 folio)
{
	if (folio)
		hvo_fn_emit(ctx, HVO_POOL_ALLOC, hvo_fn_folio_order(folio), hvo_page_pfn(folio), 0, HVO_OK, 0);
	/* a failed allocation (NULL) is not a pool event: the pool simply did not grow */
}

static __always_inline int hvo_fn_pool_alloc_exit(void *ctx, u64 folio)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_POOL_ALLOC);
	struct hvo_fn_pend *p = hvo_fn_pending.lookup(&key);

	if (!p)
		return 0;
	if (p->depth) {
		p->depth--;
		return 0;
	}
	hvo_fn_pending.delete(&key);
	hvo_fn_pool_alloc_emit(ctx, folio);
	return 0;
}

/* Return-only probe (compiler clones): silent while a probed wrapper of this task is in flight. */
static __always_inline int hvo_fn_pool_alloc_ret(void *ctx, u64 folio)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_POOL_ALLOC);

	if (hvo_fn_pending.lookup(&key))
		return 0;
	hvo_fn_pool_alloc_emit(ctx, folio);
	return 0;
}

/* --- pool free: the huge page goes back to the buddy allocator, unless its restore failed ---- */
static __always_inline int hvo_fn_pool_free_enter(u64 h, u64 head)
{
	hvo_fn_begin(HVO_FN_SLOT_POOL_FREE, h, head, 0);
	return 0;
}

static __always_inline int hvo_fn_pool_free_exit(void *ctx)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_POOL_FREE);
	struct hvo_fn_pend *p = hvo_fn_pending.lookup(&key);

	if (!p)
		return 0;
	hvo_fn_emit(ctx, HVO_POOL_FREE, p->order, hvo_page_pfn(p->head), 0, p->err ? HVO_ERROR : HVO_OK, p->err);
	hvo_fn_pending.delete(&key);
	return 0;
}

/* --- demote: one huge page (<= 6.10) ------------------------------------------------------- */
static __always_inline int hvo_fn_demote_enter(u64 h, u64 head)
{
	hvo_fn_begin(HVO_FN_SLOT_DEMOTE, h, head, 0);
	return 0;
}

static __always_inline int hvo_fn_demote_exit(void *ctx, s64 ret)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_DEMOTE);
	struct hvo_fn_pend *p = hvo_fn_pending.lookup(&key);

	if (!p)
		return 0;
	hvo_fn_emit(ctx, HVO_DEMOTE, p->order, hvo_page_pfn(p->head), p->ts,
		    ret < 0 ? HVO_ERROR : HVO_OK, ret < 0 ? -ret : 0);
	hvo_fn_pending.delete(&key);
	return 0;
}

/* --- demote: a list of huge pages (6.11+: demote_free_hugetlb_folios(src, dst, list)) ------ */
/*
 * At entry the list holds the source folios; the ones still on it at exit could not be demoted
 * (their vmemmap restore failed) and go back to the source pool.
 */
static __always_inline u64 hvo_fn_list_next(u64 node)
{
	u64 next = 0;

	bpf_probe_read_kernel(&next, sizeof(next), (void *)node);	/* list_head.next is first */
	return next;
}

static __always_inline int hvo_fn_demote_list_enter(u64 src, u64 list)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_DEMOTE);
	struct hvo_fn_pend p = {};
	u64 node = hvo_fn_list_next(list);

	p.ts = bpf_ktime_get_ns();
	p.aux = list;
	p.order = hvo_fn_hstate_order(src);
#pragma unroll
	for (int i = 0; i < HVO_FN_DEMOTE_MAX; i++) {
		if (!node || node == list)
			break;
		p.pfn[i] = hvo_page_pfn(node - HVO_FN_LRU_OFF);
		p.npfn = i + 1;
		node = hvo_fn_list_next(node);
	}
	hvo_fn_pending.update(&key, &p);
	return 0;
}

static __always_inline int hvo_fn_demote_list_exit(void *ctx, s64 ret)
{
	u64 key = hvo_fn_key(HVO_FN_SLOT_DEMOTE);
	struct hvo_fn_pend *p = hvo_fn_pending.lookup(&key);
	u64 left[HVO_FN_DEMOTE_MAX] = {};
	u64 node;
	s32 err;

	if (!p)
		return 0;
	node = hvo_fn_list_next(p->aux);
#pragma unroll
	for (int i = 0; i < HVO_FN_DEMOTE_MAX; i++) {
		if (!node || node == p->aux)
			break;
		left[i] = hvo_page_pfn(node - HVO_FN_LRU_OFF);
		node = hvo_fn_list_next(node);
	}
	err = ret < 0 ? -ret : HVO_FN_ENOMEM;
#pragma unroll
	for (int i = 0; i < HVO_FN_DEMOTE_MAX; i++) {
		u8 failed = 0;

		if (i >= p->npfn)
			break;
#pragma unroll
		for (int j = 0; j < HVO_FN_DEMOTE_MAX; j++)
			failed |= left[j] && left[j] == p->pfn[i];
		hvo_fn_emit(ctx, HVO_DEMOTE, p->order, p->pfn[i], p->ts, failed ? HVO_ERROR : HVO_OK,
			    failed ? err : 0);
	}
	hvo_fn_pending.delete(&key);
	return 0;
}
