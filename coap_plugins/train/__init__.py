"""Building blocks of the ``coap-train`` YAML runner: data shards and models.

Nothing heavy is imported here; import the submodules you need:

- :mod:`coap_plugins.train.data`: write webdataset shards (digits, ImageFolder, CIFAR-10) and
  read them back as ``(image, label)`` streams; the ``coap-data`` console script.
- :mod:`coap_plugins.train.unet`: a compact UNet and a :class:`~coap_plugins.train.unet.DDPM`
  helper for denoising-diffusion training on small images.
"""
