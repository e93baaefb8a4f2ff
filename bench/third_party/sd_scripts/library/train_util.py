# Copied from kohya-ss/sd-scripts, library/train_util.py at commit
# 48d368fa557731ad0488c07304dfeba8c07910eb (Apache-2.0, see ../LICENSE.md).
# Only what finetune/tag_images_by_wd14_tagger.py uses is kept: IMAGE_EXTENSIONS and
# glob_images_pathlib(). Every line below this header is verbatim from that file, in
# its order. Left out: the rest of the module (its imports of accelerate, transformers,
# diffusers, ... which the tagging script does not need) and the optional blocks that
# add .avif / .jxl to IMAGE_EXTENSIONS when pillow_avif / jxlpy / pillow_jxl are
# installed (none is, and the benchmark's images are JPEG and PNG).
# region dataset

IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP"]


def glob_images_pathlib(dir_path, recursive):
    image_paths = []
    if recursive:
        for ext in IMAGE_EXTENSIONS:
            image_paths += list(dir_path.rglob("*" + ext))
    else:
        for ext in IMAGE_EXTENSIONS:
            image_paths += list(dir_path.glob("*" + ext))
    image_paths = list(set(image_paths))  # 重複を排除
    image_paths.sort()
    return image_paths
