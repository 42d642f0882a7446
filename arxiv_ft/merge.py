"""Merge a LoRA/QLoRA training output into a standalone full-precision model folder for deployment.

python -m arxiv_ft.merge runs/default --out runs/default-merged
"""

import argparse

from arxiv_ft.modeling import merge_adapter


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a train.py output folder holding an adapter")
    parser.add_argument("--out", required=True, help="where the merged model goes")
    args = parser.parse_args(argv)
    print(f"merged model written to {merge_adapter(args.run_dir, args.out)}")


if __name__ == "__main__":
    main()
