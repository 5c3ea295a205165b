/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shared maps and helpers of every hvo-observer BPF program (bcc).
 *
 * In-kernel aggregation, ebpf_exporter style: hvo_emit() first adds the record to the per-CPU
 * `counts` (and, when it carries a duration, `hist`) arrays, then copies it to the output buffer.
 * A record the buffer cannot take is counted in `lost`, so the aggregates stay exact and loss is
 * never silent. User space only decodes.
 *
 * The session pastes this file at the top of the program text (bcc rewrites map calls such as
 * counts.lookup() only there, never in #include'd files): do not #include it.
 *
 * Compile-time knobs (-D, set by observer/probes/session.py):
 *   HVO_PERFBUF            use a perf buffer (kernels without BPF_MAP_TYPE_RINGBUF, < 5.8)
 *   HVO_RINGBUF_PAGES      ring buffer size in pages (power of two), default 1024 (4 MiB)
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

BPF_PERCPU_ARRAY(counts, u64, HVO_COUNT_SLOTS);
BPF_PERCPU_ARRAY(hist, u64, HVO_HIST_SLOTS);
BPF_PERCPU_ARRAY(lost, u64, 1);

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
		(*v)++;	/* per-CPU slot: no other writer on this CPU while we run */
}

/* Aggregate, then output. Returns 0, or -1 when the record was lost (it is still counted). */
static __always_inline int hvo_emit(void *ctx, struct hvo_event *e)
{
	u32 order = e->order & (HVO_MAX_ORDER - 1);
	u32 idx = HVO_COUNT_IDX(e->event, order, e->result);
	u32 zero = 0;
	int ret;

	hvo_inc(counts.lookup(&idx));
	if (e->duration_ns) {
		idx = HVO_HIST_IDX(e->event, order, hvo_log2(e->duration_ns));
		hvo_inc(hist.lookup(&idx));
	}
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

#endif
