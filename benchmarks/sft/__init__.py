"""The SFT regime of the quality study: instruction data from Python documentation (data.py), run through `opt-deus compare` (__main__.py)."""
