"""Pretrained weights (core/weights.py), one policy for the classifier and Mask R-CNN: with an empty torch
hub cache nothing is downloaded unless asked, and the error names the file, the URL and the flag; asked,
torchvision's own download fills the cache and the model starts from exactly that file. No network:
torch.hub's download function is replaced."""
import os
import urllib.error

import pytest
import torch
import torchvision

from maskless import config
from maskless.core.weights import cached_path
from maskless.pseudo.classifier import BACKBONES, build_classifier
from maskless.pseudo.classify import ClassifyConfig
from maskless.train.maskrcnn import ARCHS, build_model
from maskless.train.trainer import TrainConfig

SMALL = dict(min_size=64, max_size=64, anchor_sizes=[16, 32, 64, 128, 256])


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub cache; downloads are recorded, and served from `files` (url -> state dict)."""
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    calls, files = [], {}

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        if url not in files:
            raise urllib.error.URLError("network is unreachable")
        torch.save(files[url], dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    yield calls, files
    torch.hub.set_dir(hub)


def test_nothing_is_downloaded_unless_asked(empty_hub):
    calls, _ = empty_hub
    resnet = BACKBONES["resnet18"].imagenet
    with pytest.raises(FileNotFoundError, match="--download-weights") as e:
        build_classifier(2, "resnet18", "imagenet")
    assert cached_path(resnet) in str(e.value) and resnet.url in str(e.value)
    for arch, kind in (("resnet18_fpn", "imagenet"), ("maskrcnn_resnet50_fpn", "coco")):
        enum = ARCHS[arch].imagenet if kind == "imagenet" else ARCHS[arch].coco
        with pytest.raises(FileNotFoundError, match="--download-weights") as e:
            build_model(["a"], arch=arch, weights=kind, **SMALL)
        assert cached_path(enum) in str(e.value) and enum.url in str(e.value)
    assert calls == []  # not even tried


def test_download_when_asked_goes_through_torchvision_into_the_cache(empty_hub):
    calls, files = empty_hub
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18(weights=None).state_dict()  # stands in for the real file
    url = BACKBONES["resnet18"].imagenet.url
    assert ARCHS["resnet18_fpn"].imagenet.url == url  # both stages start from the same file
    files[url] = imagenet
    classifier = build_classifier(2, "resnet18", "imagenet", download_weights=True)
    assert calls == [url] and os.path.exists(cached_path(BACKBONES["resnet18"].imagenet))
    assert torch.equal(classifier.backbone[0].weight, imagenet["conv1.weight"])
    assert classifier.frozen_bn  # pretrained: frozen BatchNorm
    # the cached file serves the next model without another download
    model = build_model(["a"], arch="resnet18_fpn", weights="imagenet", download_weights=True, **SMALL)
    assert calls == [url]
    assert torch.equal(model.backbone.body.layer4[1].conv2.weight, imagenet["layer4.1.conv2.weight"])
    # asked, but the download fails: the error says so and names the URL; nothing is left in the cache
    mobilenet = ARCHS["mobilenet_v3_fpn"].imagenet
    with pytest.raises(FileNotFoundError, match="could not be downloaded") as e:
        build_model(["a"], arch="mobilenet_v3_fpn", weights="imagenet", download_weights=True,
                    **{**SMALL, "anchor_sizes": [16, 32, 64]})
    assert mobilenet.url in str(e.value) and not os.path.exists(cached_path(mobilenet))


def test_download_weights_is_an_option_of_both_stages():
    for cls in (ClassifyConfig, TrainConfig):
        assert cls().download_weights is False
        assert config.build(cls, {"download_weights": True}, {"data": "d", "out": "o"}).download_weights is True
