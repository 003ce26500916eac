"""`python -m comfyui_dreambooth ...` is the same program as the `comfyui-dreambooth` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
