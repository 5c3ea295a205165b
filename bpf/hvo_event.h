/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The record every hvo-observer BPF program emits, and the in-kernel aggregates.
 *
 * User space only decodes: counters and latency histograms live in in-kernel arrays so the metrics
 * stay exact even when the ring buffer overflows (lost records are counted in `lost`).
 * Keep in sync with observer/probes/events.py (a test compiles and compares the layout).
 */
#ifndef HVO_EVENT_H
#define HVO_EVENT_H

enum hvo_event_type {
	HVO_POOL_ALLOC = 1,	/* a fresh huge page enters the pool */
	HVO_POOL_FREE = 2,	/* a huge page goes back to the buddy allocator */
	HVO_OPTIMIZE = 3,	/* vmemmap of one huge page remapped and freed (or skipped) */
	HVO_RESTORE = 4,	/* vmemmap of one huge page re-allocated (may fail: -ENOMEM) */
	HVO_DEMOTE = 5,		/* a huge page split into pages of a smaller hstate */
	HVO_REMAP_FREE = 6,	/* the vmemmap remap worker, optimize side */
	HVO_REMAP_ALLOC = 7,	/* the vmemmap remap worker, restore side */
	HVO_NR_EVENTS = 8,
};

enum hvo_result {
	HVO_OK = 0,
	HVO_ERROR = 1,
	HVO_SKIPPED = 2,
	HVO_NR_RESULTS = 3,
};

#define HVO_FLAG_INFERRED 1	/* derived from counters, not seen in the function itself */
#define HVO_FLAG_UNCOUNTED 2	/* not in `counts`: a candidate user space counts once it accepts it */
#define HVO_NO_NODE 0xffffffffU	/* user space fills the node from the pfn */
#define HVO_HIST_BUCKETS 40	/* log2(ns) buckets; the last one also holds everything above 2^40 ns */
#define HVO_MAX_HSTATES 8	/* hstates the aggregates can tell apart (x86-64 has 2) */
#define HVO_NR_TIMED 5		/* operations with a duration: optimize, restore, demote, remap_free/alloc */

struct hvo_event {
	__u64 ts_ns;		/* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 pfn;		/* head page frame number */
	__u64 cgroup_id;
	__u64 duration_ns;	/* optimize/restore/remap: entry to exit */
	__u32 tgid;
	__u32 tid;
	__s32 err;		/* positive errno when result is HVO_ERROR */
	__u32 node;
	__u8 event;		/* enum hvo_event_type */
	__u8 result;		/* enum hvo_result */
	__u8 order;		/* huge page order: 9 for 2 MiB, 18 for 1 GiB on x86-64 */
	__u8 flags;
	char comm[16];
};

/*
 * Index helpers for the aggregate arrays, sized by what exists: the kernel's hstates (HVO_NR_HSTATES,
 * -D from user space, plus one slot for a page of any other order), the event types and results, and
 * for the latency histogram only the timed operations (2 hstates: 72 and 600 slots).
 */
#ifndef HVO_NR_HSTATES
#define HVO_NR_HSTATES 0
#endif
#define HVO_HSTATE_SLOTS (HVO_NR_HSTATES + 1)
#define HVO_COUNT_IDX(hs, ev, res) (((hs) * HVO_NR_EVENTS + (ev)) * HVO_NR_RESULTS + (res))
#define HVO_COUNT_SLOTS (HVO_HSTATE_SLOTS * HVO_NR_EVENTS * HVO_NR_RESULTS)
#define HVO_TIMED_OP(ev) ((ev) - HVO_OPTIMIZE)	/* event type -> timed operation (ev >= HVO_OPTIMIZE) */
#define HVO_HIST_IDX(hs, op, bucket) (((hs) * HVO_NR_TIMED + (op)) * HVO_HIST_BUCKETS + (bucket))
#define HVO_HIST_SLOTS (HVO_HSTATE_SLOTS * HVO_NR_TIMED * HVO_HIST_BUCKETS)

#endif
