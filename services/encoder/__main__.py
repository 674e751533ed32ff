"""`python -m services.encoder --model LLAVA_FOLDER [flags]`: one multimodal encoder (flags: --help)."""

import sys
from collections.abc import Sequence

from services.encoder.config import EncoderConfig
from services.encoder.service import EncoderService
from shared.service import main as serve_main


def main(argv: Sequence[str] | None = None) -> int:
    return serve_main(EncoderService, EncoderConfig, "python -m services.encoder", argv)


if __name__ == "__main__":
    sys.exit(main())
