"""ImageNet-1k (1.28 M training images, 1,000 classes) with CLIP ViT-B/32, for a Cloud TPU VM or pod slice.

Data: TFDS imagenet2012 needs the archives downloaded by hand (TFDS's manual_dir), then prepared in array_record
format (`tfds build imagenet2012 --file_format=array_record`). Its label names are WordNet ids: give readable
names with --class-names (ImageNet's LOC_synset_mapping.txt, "n01440764 tench, Tinca tinca" lines).

    clipsel select --config configs/imagenet1k.py --class-names LOC_synset_mapping.txt
    # on every host of a pod slice, the same command (each host reads its shard):
    gcloud compute tpus tpu-vm ssh NAME --worker=all --command "clipsel select --config configs/imagenet1k.py ..."
    clipsel select --config configs/imagenet1k.py --limit 20000 --adapter-epochs 1   # local debug run
"""


def get_config():
    return dict(
        data=dict(path="tfds:imagenet2012", subdir="train"),
        encoder=dict(name="openai/clip-vit-base-patch32"),
        embed=dict(prompts=["A photo of a {}."], batch_size=1024,
                   workers=16),  # decoding JPEGs is the bottleneck on a TPU VM host
        adapt=dict(kind="linear", epochs=10),
        scores=dict(k_fraction=0.1,  # K = 128 per class
                    reference_threshold=2000),  # ~1,300 per class: exact; lower it to trade accuracy for time
        ratio=0.3,
        method="clipsel",  # alignment probability, alpha 0.1, per-class quotas; "paper": the paper's text
        workdir="out/imagenet1k",
    )
