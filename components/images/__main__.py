"""``python -m nemoforge_components.images lock|check|ref|base SET``: see the package docstring."""

import argparse
import sys

from nemoforge_components.images import check_lock, image_ref, load_images, lock


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m nemoforge_components.images")
    parser.add_argument("action", choices=["lock", "check", "ref", "base"])
    parser.add_argument("image_set", choices=sorted(load_images()["sets"]))
    args = parser.parse_args()
    if args.action == "ref":
        print(image_ref(args.image_set))
    elif args.action == "base":
        print(load_images()["sets"][args.image_set]["base"])
    elif args.action == "lock":
        print(f"wrote {lock(args.image_set)}")
    else:
        diff = check_lock(args.image_set)
        for name, (pinned, resolved) in diff.items():
            print(f"{name}: lock {pinned} -> resolves to {resolved}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
