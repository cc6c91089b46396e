"""`saekit inspect`: a static, offline dashboard (or a Neuronpedia-style JSON export) of an SAE's latents.

config.py holds the command's schema, collect.py the one-pass collection of per-latent statistics and contexts,
features.py turns them into one record per latent, site.py and export_json.py write those records, run.py is the
task function that ties them together.
"""
