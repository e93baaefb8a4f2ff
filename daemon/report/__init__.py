"""Know your dataset (issue 14): the dataset report, the caption checks and the
perceptual hashes behind near duplicates.

- :mod:`daemon.report.rules`: the checks' rules, as data (word lists per tag group).
- :mod:`daemon.report.checks`: reads captions, applies the rules, keeps flags.
- :mod:`daemon.report.stats`: the report itself, from the index only.
- :mod:`daemon.report.phash`: perceptual hashes (imagehash), once per content.
- :mod:`daemon.report.html`: the standalone HTML report with plots (matplotlib).
- :mod:`daemon.report.service`: the daemon's side (lazy checks, the background pass).
"""
