"""The audit's defaults, in one light module (the CLI builds its parser from them without loading torch)."""

DEFAULT_OCCLUSION = (48, 32)      # window, stride: the report's pointing game (the rows agree with its figure)
DEFAULT_LOW_CONFIDENCE = 0.5      # flag an image whose top-1 probability is below this
DEFAULT_BATCH_SIZE = 16           # images per batch, and per written Parquet part
DEFAULT_TOLERANCE = 15            # pixels: the pointing game's usual tolerance
DEFAULT_GATE_IMAGES = 100        # held-out images the occlusion agreement gate compares on (audit.gate)
DEFAULT_MIN_AGREEMENT = 0.98      # the share of them on which a fast mode's evidence must agree with exact
