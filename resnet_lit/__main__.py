"""`python -m resnet_lit` is the same as the `resnet-lit` command."""

from resnet_lit.cli import main

if __name__ == "__main__":
    main()
