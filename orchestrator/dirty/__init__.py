"""Dirty pages and where they live: guest RAM layout, IOVA ranges and page runs, the
kernel-layout dirty bitmap every tracker merges into, page content digests."""
