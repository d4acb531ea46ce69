"""The ``coap-train`` YAML runner and its building blocks.

Nothing heavy is imported here; import the submodules you need:

- :mod:`coap_plugins.train.config`: the recipe schema (:class:`~coap_plugins.train.config.TrainConfig`),
  ``load_config`` with overrides, base recipes and errors that name the key.
- :mod:`coap_plugins.train.cli`: ``coap-train CONFIG.yaml [dotted.key=value ...]`` and ``run(cfg)``.
- :mod:`coap_plugins.train.composer_run` / :mod:`coap_plugins.train.lightning_run`: the recipe as a
  Composer ``Trainer`` with ``CoapAlgorithm`` or a Lightning ``Trainer`` with ``CoapCallback``.
- :mod:`coap_plugins.train.common`, :mod:`coap_plugins.train.tasks`: what both runners share
  (optimizer, LR shape, models, the classification and DDPM objectives).
- :mod:`coap_plugins.train.data`: write webdataset shards (digits, ImageFolder, CIFAR-10) and
  read them back; the ``coap-data`` console script.
- :mod:`coap_plugins.train.loader`: find, write and check the shards; resumable per-epoch loaders.
- :mod:`coap_plugins.train.checkpoints`: which checkpoint a resumed run loads (the newest that reads).
- :mod:`coap_plugins.train.outputs`, :mod:`coap_plugins.train.report`: the run folder
  (metrics, summary, report, plots) and the ``coap-report`` console script.
- :mod:`coap_plugins.train.unet`: a compact UNet and a :class:`~coap_plugins.train.unet.DDPM`
  helper for denoising-diffusion training on small images.
"""
