"""Tools around the method: the token view (which tokens a scorer marks, and the weights they get).

* :mod:`.tokenview`  scores and weights of a text as HTML or PNG.
* :mod:`.view`       ``python -m lctw.tools.view text=<file>``: score a text with any model and scorer.

May import everything (the tools sit on top: they build θ and θ′ as a run does); nothing imports them
except the training callbacks, which draw token views of validation samples.
"""
