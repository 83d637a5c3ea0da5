"""netshrink_lab: the experiment harness around the netshrink library.

It holds what the demo, the benchmarks and the CLI's experiment commands need and the
library does not: reference models and their cached baselines (`netshrink_lab.zoo`, which
registers its architectures with `netshrink.arch` when imported), offline data sets
(`netshrink_lab.data`: Fashion-MNIST from Debian's package, scikit-image's photos),
pretrained models from PyPI packages (`netshrink_lab.pretrained`) and the end-to-end demo
(`netshrink_lab.demo`). It imports the library; the library never imports it, except the
CLI inside the commands that need it.
"""
