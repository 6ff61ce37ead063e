"""Model families: what differs between SD-1.x/2.x and SDXL (sd), the base and its trainables (base), the
built-in tiny bases (tiny, tiny_xl)."""
