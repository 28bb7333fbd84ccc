"""The paper's analyses (Zeiler & Fergus 2014, §3-4), one module per figure or table, each with its
computation, its ``TITLE``, ``section()`` (the figure files) and ``summary()`` (its headline numbers):

- :mod:`.top9`: top-9 activations per feature map, projected with the deconvnet (Fig. 2);
- :mod:`.evolution`: feature evolution over the training snapshots (Fig. 4);
- :mod:`.invariance`: feature distances and the true class's probability under transforms (Fig. 5);
- :mod:`.architecture`: 7x7/2 vs 11x11/4 first layers, with and without RMS clipping (Fig. 6);
- :mod:`.localization`: occlusion sensitivity (Fig. 7), the pointing game and deconv energy on the object;
- :mod:`.correspondence`: the part-occlusion consistency score (Table 1);
- :mod:`.filters`: the layer-1 filters and their statistics.

:mod:`.dataset` is the image set they run over, :mod:`.figures` what the sections share, :mod:`.report` the
one registry of sections, their settings and the HTML page.
"""
