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
 *    page_isolation:test_pages_isolated over exactly one naturally aligned gigantic page. A candidate:
 *    user space confirms it in /proc/kpageflags and retracts it otherwise.
 *  - pool_free: mm_page_free at a hugetlb order of a pfn in hvo_tp_known (pfns of hugetlb pages:
 *    added here on allocation, seeded from /proc/kpageflags by user space at start).
 */
#ifndef HVO_TP_KNOWN_MAX
#define HVO_TP_KNOWN_MAX 16384
#endif

/* head pfn -> order of every hugetlb page we know of */
BPF_HASH(hvo_tp_known, u64, u8, HVO_TP_KNOWN_MAX);

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
	u8 o = order;

	if (!HVO_ORDER_IN(HVO_TP_BUDDY_ORDERS, order))
		return 0;
	page = HVO_ARG(ctx, 0);
	gfp = (u32)HVO_ARG(ctx, 2);
	pfn = page ? hvo_page_pfn(page) : (u64)-1;
	if (!HVO_GFP_IS_HUGETLB(gfp)) {
		/* THP & co. at this order: if the pfn was ours, our entry is stale (a free we missed) */
		if (page)
			hvo_tp_known.delete(&pfn);
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
	hvo_tp_known.update(&pfn, &o);
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
	u64 n;
	u32 order;
	u8 o;

	if (end > fin || end <= start)
		return 0;	/* isolation failed: alloc_contig_range gives up on this range */
	n = end - start;
	if (n & (n - 1))
		return 0;
	order = hvo_log2(n);
	if (!HVO_ORDER_IN(HVO_TP_CONTIG_ORDERS, order) || (start & (n - 1)))
		return 0;
	o = order;
	hvo_tp_known.update(&start, &o);
	hvo_event_init(&e, HVO_POOL_ALLOC, order, start);
	hvo_emit(ctx, &e);
	return 0;
}

/* mm_page_free(struct page *page, unsigned int order) */
int hvo_tp_page_free(struct bpf_raw_tracepoint_args *ctx)
{
	u32 order = (u32)HVO_ARG(ctx, 1);
	struct hvo_event e;
	u64 pfn;
	u8 *known;

	if (!HVO_ORDER_IN(HVO_TP_ORDERS, order))
		return 0;
	pfn = hvo_page_pfn(HVO_ARG(ctx, 0));
	known = hvo_tp_known.lookup(&pfn);
	if (!known || *known != order)
		return 0;
	hvo_tp_known.delete(&pfn);
	hvo_event_init(&e, HVO_POOL_FREE, order, pfn);
	hvo_emit(ctx, &e);
	return 0;
}
