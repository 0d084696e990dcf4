"""The command layer: what each ``gen-ad`` subcommand runs, one module per command.

``gen_ad.cli`` only parses arguments and calls these functions; the library packages below
(data, models, scoring, inversion, baselines, metrics, training, report, utils) never import
this package.
"""
