"""`python -m resnet_lit.bench`: the same as `resnet-lit benchmark`."""

from resnet_lit.bench.command import main

raise SystemExit(main())
