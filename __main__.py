"""`python -m comfyui_dreambooth ...` is the same program as the `comfyui-dreambooth` command."""
import sys

try:
    from .cli import main
except KeyboardInterrupt:          # Ctrl-C while the program starts (each process under a launcher): no traceback
    print("error: interrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
