"""The glyph demo: its data, its stand-in encoder, its judge and the demo itself (the core library does not import it)."""
