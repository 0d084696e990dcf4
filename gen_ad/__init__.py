"""gen_ad."""
