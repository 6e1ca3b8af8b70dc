"""The quality loop: labelled images → metrics and report (``modgate eval``), stored
verdicts under another policy (``modgate replay``), fitted thresholds and fusion
(``modgate calibrate``). It reads verdicts and policies and never reaches into the
pipeline; ``eval`` without stored verdicts goes through ``worker.tools.scan`` like ``modgate scan``.
scikit-learn and matplotlib (the ``eval`` extra) are imported only here, never by the worker."""
