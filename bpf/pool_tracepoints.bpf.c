/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Tracepoint mode: hugetlb pool allocations and frees seen through the page allocator's
 * tracepoints, for kernels where neither kprobes nor fentry can be used.
 *
 * No kernel header describes the tracepoint records here: every field is read at the offset and
 * size parsed from the event's format file at run time (-D HVO_TP_<EVENT>_<FIELD>_OFF/_SIZE), and
 * the gfp bit values come from mm_page_alloc's print format (-D HVO_GFP_*): both changed across
 * kernel versions. Set by observer/probes/tracepoint.py (HVO_GFP_ALL/NONE/ANY: its HUGETLB_GFP rule).
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

#define HVO_LOAD(ctx, off, size)						\
	((size) == 8 ? *(u64 *)((char *)(ctx) + (off)) :			\
	 (size) == 4 ? (u64)*(u32 *)((char *)(ctx) + (off)) :			\
	 (size) == 2 ? (u64)*(u16 *)((char *)(ctx) + (off)) :			\
		       (u64)*(u8 *)((char *)(ctx) + (off)))

/* observer/probes/tracepoint.py HUGETLB_GFP: all of HVO_GFP_ALL, none of HVO_GFP_NONE, one of HVO_GFP_ANY */
#define HVO_GFP_IS_HUGETLB(g)							\
	(((g) & HVO_GFP_ALL) == HVO_GFP_ALL && !((g) & HVO_GFP_NONE) && ((g) & HVO_GFP_ANY))

/* HVO_TP_BUDDY_ORDERS / HVO_TP_CONTIG_ORDERS / HVO_TP_ORDERS: bit o set when o is such an hstate order */
#define HVO_ORDER_IN(mask, o) ((o) < 64 && (((u64)(mask) >> (o)) & 1))

int hvo_tp_page_alloc(void *ctx)
{
	u32 order = HVO_LOAD(ctx, HVO_TP_ALLOC_ORDER_OFF, HVO_TP_ALLOC_ORDER_SIZE);
	struct hvo_event e;
	u64 pfn, gfp;
	u8 o = order;

	if (!HVO_ORDER_IN(HVO_TP_BUDDY_ORDERS, order))
		return 0;
	pfn = HVO_LOAD(ctx, HVO_TP_ALLOC_PFN_OFF, HVO_TP_ALLOC_PFN_SIZE);
	gfp = HVO_LOAD(ctx, HVO_TP_ALLOC_GFP_OFF, HVO_TP_ALLOC_GFP_SIZE);
	if (!HVO_GFP_IS_HUGETLB(gfp)) {
		/* THP & co. at this order: if the pfn was ours, our entry is stale (a free we missed) */
		if (pfn != (u64)-1)
			hvo_tp_known.delete(&pfn);
		return 0;
	}
	if (pfn == (u64)-1) {
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

int hvo_tp_pages_isolated(void *ctx)
{
	u64 start = HVO_LOAD(ctx, HVO_TP_ISO_START_OFF, HVO_TP_ISO_START_SIZE);
	u64 end = HVO_LOAD(ctx, HVO_TP_ISO_END_OFF, HVO_TP_ISO_END_SIZE);
	u64 fin = HVO_LOAD(ctx, HVO_TP_ISO_FIN_OFF, HVO_TP_ISO_FIN_SIZE);
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

int hvo_tp_page_free(void *ctx)
{
	u32 order = HVO_LOAD(ctx, HVO_TP_FREE_ORDER_OFF, HVO_TP_FREE_ORDER_SIZE);
	struct hvo_event e;
	u64 pfn;
	u8 *known;

	if (!HVO_ORDER_IN(HVO_TP_ORDERS, order))
		return 0;
	pfn = HVO_LOAD(ctx, HVO_TP_FREE_PFN_OFF, HVO_TP_FREE_PFN_SIZE);
	known = hvo_tp_known.lookup(&pfn);
	if (!known || *known != order)
		return 0;
	hvo_tp_known.delete(&pfn);
	hvo_event_init(&e, HVO_POOL_FREE, order, pfn);
	hvo_emit(ctx, &e);
	return 0;
}
