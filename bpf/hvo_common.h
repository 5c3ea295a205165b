/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shared maps and helpers of every hvo-observer BPF program (bcc).
 *
 * In-kernel aggregation, ebpf_exporter style: hvo_emit() first adds the record to the `counts` (and,
 * when it carries a duration, `hist`) arrays, then copies it to the output buffer. A record the
 * buffer cannot take is counted in `lost`, so the aggregates stay exact and loss is never silent.
 * User space only decodes.
 *
 * The aggregates are plain arrays with atomic adds, not per-CPU arrays: a per-CPU map costs its size
 * once per *possible* CPU (384 on big hosts) in kernel memory and in every read, while an atomic add
 * costs little next to what it counts (a vmemmap remap with its TLB flush, a huge page allocation)
 * and next to the ring buffer's own lock, taken for every record anyway.
 *
 * The session pastes this file at the top of the program text (bcc rewrites map calls such as
 * counts.lookup() only there, never in #include'd files): do not #include it.
 *
 * Compile-time knobs (-D, set by observer/probes/session.py):
 *   HVO_PERFBUF            use a perf buffer (kernels without BPF_MAP_TYPE_RINGBUF, < 5.8)
 *   HVO_RINGBUF_PAGES      ring buffer size in pages (power of two), default 1024 (4 MiB)
 *   HVO_NR_HSTATES         the kernel's hstates, HVO_HSTATE_ORDER_<i> (i < HVO_NR_HSTATES) their
 *                          orders: the hstate index of the aggregates (hvo_event.h)
 *   HVO_BLOCK_PFN_SHIFT    log2(memory block size / PAGE_SIZE); enables hvo_pfn_node()
 *   HVO_NODE_BLOCKS        entries of `hvo_block_node` (highest memory block index + 1)
 *   HVO_SPAGE              sizeof(struct page); enables hvo_page_pfn() (observer/probes/page_pfn.py)
 *   HVO_VMEMMAP_BASE_ADDR  address of the kernel variable vmemmap_base (KASLR: read at run time), or
 *   HVO_VMEMMAP_BASE       the constant start of the vmemmap (kernels without that variable)
 *
 * No kernel struct is read through headers here: the host's headers may not match the kernel.
 * Programs that need struct offsets take them from BTF as -D defines.
 */
#ifndef HVO_COMMON_H
#define HVO_COMMON_H

#include "hvo_event.h"

#ifndef HVO_RINGBUF_PAGES
#define HVO_RINGBUF_PAGES 1024
#endif

#ifdef HVO_PERFBUF
BPF_PERF_OUTPUT(events);
#else
BPF_RINGBUF_OUTPUT(events, HVO_RINGBUF_PAGES);
#endif

BPF_ARRAY(counts, u64, HVO_COUNT_SLOTS);
BPF_ARRAY(hist, u64, HVO_HIST_SLOTS);
BPF_ARRAY(lost, u64, 1);

#if defined(HVO_BLOCK_PFN_SHIFT) && defined(HVO_NODE_BLOCKS)
/* memory block index -> node + 1 (0: unknown), filled from /sys/devices/system/memory by user space */
BPF_ARRAY(hvo_block_node, u32, HVO_NODE_BLOCKS);

static __always_inline u32 hvo_pfn_node(u64 pfn)
{
	u32 blk = pfn >> HVO_BLOCK_PFN_SHIFT;
	u32 *n = hvo_block_node.lookup(&blk);

	return (n && *n) ? *n - 1 : HVO_NO_NODE;
}
#else
static __always_inline u32 hvo_pfn_node(u64 pfn)
{
	return HVO_NO_NODE;
}
#endif

#ifdef HVO_SPAGE
/* struct page pointer -> pfn: the vmemmap is one virtually contiguous array of struct pages. */
static __always_inline u64 hvo_page_pfn(u64 page)
{
#ifdef HVO_VMEMMAP_BASE_ADDR
	u64 base = 0;

	bpf_probe_read_kernel(&base, sizeof(base), (void *)HVO_VMEMMAP_BASE_ADDR);
#else
	u64 base = HVO_VMEMMAP_BASE;
#endif
	return page >= base ? (page - base) / HVO_SPAGE : 0;
}
#endif

/* The aggregates' hstate index of a huge page order; HVO_NR_HSTATES for an order of no hstate. */
static __always_inline u32 hvo_hstate_idx(u32 order)
{
#define HVO_HSTATE_IS(i) if (HVO_NR_HSTATES > (i) && order == HVO_HSTATE_ORDER_##i) return (i);
#if HVO_NR_HSTATES > 0
	HVO_HSTATE_IS(0)
#endif
#if HVO_NR_HSTATES > 1
	HVO_HSTATE_IS(1)
#endif
#if HVO_NR_HSTATES > 2
	HVO_HSTATE_IS(2)
#endif
#if HVO_NR_HSTATES > 3
	HVO_HSTATE_IS(3)
#endif
#if HVO_NR_HSTATES > 4
	HVO_HSTATE_IS(4)
#endif
#if HVO_NR_HSTATES > 5
	HVO_HSTATE_IS(5)
#endif
#if HVO_NR_HSTATES > 6
	HVO_HSTATE_IS(6)
#endif
#if HVO_NR_HSTATES > 7
	HVO_HSTATE_IS(7)
#endif
#undef HVO_HSTATE_IS
	return HVO_NR_HSTATES;
}

/* floor(log2(v)) for v > 0, branch-free so the verifier sees no loop: bucket i holds [2^i, 2^(i+1)) ns. */
static __always_inline u32 hvo_log2(u64 v)
{
	u32 r, s;

	r = (v > 0xFFFFFFFFULL) << 5; v >>= r;
	s = (v > 0xFFFF) << 4; v >>= s; r |= s;
	s = (v > 0xFF) << 3; v >>= s; r |= s;
	s = (v > 0xF) << 2; v >>= s; r |= s;
	s = (v > 0x3) << 1; v >>= s; r |= s;
	return r | (u32)(v >> 1);
}

/* Fill the common part of a record: time, current task, pfn and its node. */
static __always_inline void hvo_event_init(struct hvo_event *e, u8 type, u8 order, u64 pfn)
{
	u64 id = bpf_get_current_pid_tgid();

	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_ns();
	e->pfn = pfn;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->tgid = id >> 32;
	e->tid = (u32)id;
	e->node = hvo_pfn_node(pfn);
	e->event = type;
	e->order = order;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
}

static __always_inline void hvo_inc(void *map_lookup_result)
{
	u64 *v = map_lookup_result;

	if (v)
		__sync_fetch_and_add(v, 1);	/* other CPUs add to the same slot */
}

/* Output only (the record is not in `counts`/`hist`). Returns 0, or -1 when the record was lost. */
static __always_inline int hvo_output(void *ctx, struct hvo_event *e)
{
	u32 zero = 0;
	int ret;

#ifdef HVO_PERFBUF
	ret = events.perf_submit(ctx, e, sizeof(*e));
#else
	ret = events.ringbuf_output(e, sizeof(*e), 0);
#endif
	if (ret < 0) {
		hvo_inc(lost.lookup(&zero));
		return -1;
	}
	return 0;
}

/* Aggregate, then output. Returns 0, or -1 when the record was lost (it is still counted). */
static __always_inline int hvo_emit(void *ctx, struct hvo_event *e)
{
	u32 hs = hvo_hstate_idx(e->order);
	u32 idx = HVO_COUNT_IDX(hs, e->event, e->result);	/* out of range: lookup gives NULL */
	u32 bucket;

	hvo_inc(counts.lookup(&idx));
	if (e->duration_ns && e->event >= HVO_OPTIMIZE && e->event < HVO_NR_EVENTS) {
		bucket = hvo_log2(e->duration_ns);
		if (bucket >= HVO_HIST_BUCKETS)
			bucket = HVO_HIST_BUCKETS - 1;
		idx = HVO_HIST_IDX(hs, HVO_TIMED_OP(e->event), bucket);
		hvo_inc(hist.lookup(&idx));
	}
	return hvo_output(ctx, e);
}

#endif
