/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Tracepoint mode: hugetlb pool allocations and frees seen through the page allocator's
 * tracepoints, for kernels where neither kprobes nor fentry can be used.
 *
 * The programs attach as raw tracepoints (BPF_RAW_TRACEPOINT_OPEN): they get the tracepoint's
 * arguments as they are (struct page *, order, gfp) instead of a trace record built for them, and
 * need no perf event. That matters because mm_page_alloc and mm_page_free fire for every page the
 * kernel allocates and frees: a perf-event tracepoint builds a record and runs the perf machinery
 * each time, a raw tracepoint only calls the program (observer/probes/tracepoint.py checks the
 * argument lists against the kernel's BTF; they have not changed since 2.6.33).
 *
 * -D defines (observer/probes/tracepoint.py): HVO_GFP_ALL/NONE/ANY (its HUGETLB_GFP rule, bit values
 * from mm_page_alloc's print format: they changed across kernel versions), the hstate orders, and
 * HVO_SPAGE/HVO_VMEMMAP_BASE* for hvo_page_pfn() (hvo_common.h).
 *
 * Heuristics (see observer/probes/tracepoint.py for their limits):
 *  - pool_alloc (buddy hstates, order <= MAX_PAGE_ORDER): mm_page_alloc at a hugetlb order whose gfp
 *    has hugetlb's signature: htlb_alloc_mask() is GFP_HIGHUSER[_MOVABLE] (so __GFP_HARDWALL),
 *    alloc_buddy_hugetlb_folio() adds __GFP_COMP and usually __GFP_RETRY_MAYFAIL, pool growth adds
 *    __GFP_THISNODE; every THP/shmem-THP mask (GFP_TRANSHUGE*) carries __GFP_NOMEMALLOC, page-cache
 *    large folios carry neither __GFP_RETRY_MAYFAIL nor __GFP_THISNODE.
 *  - pool_alloc (gigantic hstates, from alloc_contig_range: no mm_page_alloc): a successful
 *    page_isolation:test_pages_isolated over exactly one naturally aligned gigantic page. A candidate
 *    (HVO_FLAG_UNCOUNTED, not in `counts`): user space confirms it in /proc/kpageflags and counts it,
 *    or retracts it.
 *  - pool_free: mm_page_free at a hugetlb order of a pfn in hvo_tp_known (pfns of hugetlb pages:
 *    added here on allocation, seeded from /proc/kpageflags by user space at start).
 *
 * hvo_tp_known is an array with one slot per frame of the smallest hstate (pfn >> HVO_TP_FRAME_SHIFT),
 * holding the order of the hugetlb page whose head is that frame, 0 for none: a head is aligned to its
 * order, so no two pages share a slot. The verifier inlines an array lookup into a few instructions;
 * a hash lookup, update and delete per pool page cost about a third of what these programs add to a
 * pool resize. 8 bytes per 2 MiB of physical address space (0.0004 %), sized by user space with room
 * for memory hot-added later; a frame beyond it is not tracked (see tracepoint.py).
 */
#ifndef HVO_TP_FRAME_SHIFT
#define HVO_TP_FRAME_SHIFT 9
#endif
#ifndef HVO_TP_FRAMES
#define HVO_TP_FRAMES 16384
#endif

BPF_ARRAY(hvo_tp_known, u8, HVO_TP_FRAMES);

/* The slot of head pfn `pfn` of an `order` page, or NULL (not aligned to its order, out of range) */
static __always_inline u8 *hvo_tp_slot(u64 pfn, u32 order)
{
	u32 frame;

	if (pfn & ((1ULL << order) - 1) || (pfn >> HVO_TP_FRAME_SHIFT) >= HVO_TP_FRAMES)
		return 0;
	frame = pfn >> HVO_TP_FRAME_SHIFT;
	return hvo_tp_known.lookup(&frame);
}

/* Argument i of the tracepoint (TP_PROTO order), as a 64-bit slot of the raw tracepoint context. */
#define HVO_ARG(ctx, i) (((struct bpf_raw_tracepoint_args *)(ctx))->args[i])

/* observer/probes/tracepoint.py HUGETLB_GFP: all of HVO_GFP_ALL, none of HVO_GFP_NONE, one of HVO_GFP_ANY */
#define HVO_GFP_IS_HUGETLB(g)							\
	(((g) & HVO_GFP_ALL) == HVO_GFP_ALL && !((g) & HVO_GFP_NONE) && ((g) & HVO_GFP_ANY))

/* HVO_TP_BUDDY_ORDERS / HVO_TP_CONTIG_ORDERS / HVO_TP_ORDERS: bit o set when o is such an hstate order */
#define HVO_ORDER_IN(mask, o) ((o) < 64 && (((u64)(mask) >> (o)) & 1))

/* mm_page_alloc(struct page *page, unsigned int order, gfp_t gfp_flags, int migratetype) */
int hvo_tp_page_alloc(struct bpf_raw_tracepoint_args *ctx)
{
	u32 order = (u32)HVO_ARG(ctx, 1);
	struct hvo_event e;
	u64 page, pfn, gfp;
	u8 *slot;

	if (!HVO_ORDER_IN(HVO_TP_BUDDY_ORDERS, order))
		return 0;
	page = HVO_ARG(ctx, 0);
	gfp = (u32)HVO_ARG(ctx, 2);
	pfn = page ? hvo_page_pfn(page) : (u64)-1;
	if (!HVO_GFP_IS_HUGETLB(gfp)) {
		/* THP & co. at this order: if the pfn was ours, our entry is stale (a free we missed) */
		slot = page ? hvo_tp_slot(pfn, order) : 0;
		if (slot && *slot)
			*slot = 0;
		return 0;
	}
	if (!page) {
		/* the buddy allocator could not give hugetlb a page (the pool grows less than asked) */
		hvo_event_init(&e, HVO_POOL_ALLOC, order, 0);
		e.result = HVO_ERROR;
		e.err = 12; /* ENOMEM */
		hvo_emit(ctx, &e);
		return 0;
	}
	slot = hvo_tp_slot(pfn, order);
	if (slot)
		*slot = order;
	hvo_event_init(&e, HVO_POOL_ALLOC, order, pfn);
	hvo_emit(ctx, &e);
	return 0;
}

/* test_pages_isolated(unsigned long start_pfn, unsigned long end_pfn, unsigned long fin_pfn) */
int hvo_tp_pages_isolated(struct bpf_raw_tracepoint_args *ctx)
{
	u64 start = HVO_ARG(ctx, 0);
	u64 end = HVO_ARG(ctx, 1);
	u64 fin = HVO_ARG(ctx, 2);
	struct hvo_event e;
	u8 *slot;
	u64 n;
	u32 order;

	if (end > fin || end <= start)
		return 0;	/* isolation failed: alloc_contig_range gives up on this range */
	n = end - start;
	if (n & (n - 1))
		return 0;
	order = hvo_log2(n);
	if (!HVO_ORDER_IN(HVO_TP_CONTIG_ORDERS, order) || (start & (n - 1)))
		return 0;
	slot = hvo_tp_slot(start, order);
	if (slot)
		*slot = order;
	hvo_event_init(&e, HVO_POOL_ALLOC, order, start);
	/* A candidate: user space counts it once confirmed, so a retracted one never counts (counters
	 * must not go down). Its record can still be lost: then it is found by a resync. */
	e.flags = HVO_FLAG_UNCOUNTED;
	hvo_output(ctx, &e);
	return 0;
}

/* mm_page_free(struct page *page, unsigned int order) */
int hvo_tp_page_free(struct bpf_raw_tracepoint_args *ctx)
{
	u32 order = (u32)HVO_ARG(ctx, 1);
	struct hvo_event e;
	u64 pfn;
	u8 *slot;

	if (!HVO_ORDER_IN(HVO_TP_ORDERS, order))
		return 0;
	pfn = hvo_page_pfn(HVO_ARG(ctx, 0));
	slot = hvo_tp_slot(pfn, order);
	if (!slot || *slot != order)
		return 0;
	*slot = 0;
	hvo_event_init(&e, HVO_POOL_FREE, order, pfn);
	hvo_emit(ctx, &e);
	return 0;
}
