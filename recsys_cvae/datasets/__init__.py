"""Raw inputs: layout detection and strict row parsers, synthetic data (`synthetic`).

`layouts` is the entry point (`detect_layout`, `Layout.parse`, `iter_raw_rows`, `read_items`);
it sends rows through the readers of each layout (`movielens`, `generic_tables`) and the checks
they share (`rows`), refusing with the errors of `errors`.
"""
