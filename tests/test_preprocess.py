"""The uint8 image path against CLIPImageProcessor(Pil) + CLIPModel on real photos (shipped by scikit-image)."""

import numpy as np
import pytest
from PIL import Image

import clipsel_jax as cs
from clipsel_jax.data.preprocess import ImagePreprocessing, as_rgb_uint8, prepare_images

skdata = pytest.importorskip("skimage.data")
torch = pytest.importorskip("torch")
from transformers import CLIPImageProcessorPil  # noqa: E402


def photos():
    """Real photos of several shapes and kinds: landscape and portrait RGB, grayscale, RGBA with transparency."""
    return {
        "chelsea": skdata.chelsea(),  # (300, 451, 3)
        "astronaut": skdata.astronaut(),  # (512, 512, 3)
        "coffee_portrait": np.ascontiguousarray(skdata.coffee().transpose(1, 0, 2)),  # (600, 400, 3)
        "camera_gray": skdata.camera(),  # (512, 512)
        "logo_rgba": skdata.logo(),  # (500, 500, 4)
        "tiny": skdata.chelsea()[100:120, 200:213],  # smaller than the crop: upsampled
    }


def reference_pixels(proc, image):
    # The processor takes grayscale only as a PIL image; give it PIL images throughout (its convert_rgb path).
    return proc([Image.fromarray(image)], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


@pytest.mark.parametrize("size", [224, 32])
def test_uint8_to_normalised_pixels_matches_clip_image_processor(size):
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pre = ImagePreprocessing(size, (size, size))
    for name, img in photos().items():
        ours = prepare_images([img], pre)[0]
        assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
        normed = (ours.astype(np.float32) / 255 - np.array(pre.image_mean, np.float32)) / np.array(pre.image_std,
                                                                                                    np.float32)
        np.testing.assert_allclose(normed, reference_pixels(proc, img), atol=1e-5, err_msg=name)


def test_pil_images_and_arrays_agree():
    pre = ImagePreprocessing(64, (64, 64))
    img = skdata.chelsea()
    from_pil = prepare_images([Image.fromarray(img)], pre)
    np.testing.assert_array_equal(from_pil, prepare_images(img[None], pre))
    rgba = skdata.logo()
    np.testing.assert_array_equal(prepare_images([Image.fromarray(rgba)], pre), prepare_images(rgba[None], pre))
    gray = skdata.camera()
    np.testing.assert_array_equal(prepare_images([Image.fromarray(gray)], pre), prepare_images(gray[None], pre))


def test_grayscale_and_rgba_conversion():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(as_rgb_uint8(gray), np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(as_rgb_uint8(gray[..., None]), np.repeat(gray[..., None], 3, -1))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # opaque red pixel; the others are fully transparent -> white
    out = as_rgb_uint8(rgba)
    assert out[0, 0].tolist() == [200, 0, 0] and out[1, 1].tolist() == [255, 255, 255]


def test_real_photo_features_match_clip(tiny_clip):
    """Photos of different sizes in one call (a list) against the processor + CLIPModel."""
    folder, model, tok, proc = tiny_clip
    enc = cs.load_encoder(str(folder))
    imgs = list(photos().values())
    ours = enc.encode_images(imgs)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=proc([Image.fromarray(i) for i in imgs], return_tensors="pt")["pixel_values"]).pooler_output
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4, rtol=0)
    # The batch path (one array, several images) gives the same as the list path.
    chelsea = photos()["chelsea"]
    np.testing.assert_allclose(enc.encode_images(np.stack([chelsea] * 5)), np.repeat(ours[:1], 5, 0), atol=1e-5)
