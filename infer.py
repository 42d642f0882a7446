"""Classify arXiv papers with a train.py output folder or a base model (see arxiv_ft/infer.py for the whole story).

accelerate launch infer.py --model-dir runs/default --input papers.jsonl.gz --output preds.jsonl
accelerate launch --num_processes 8 infer.py --model-dir runs/x --input 'dump/part*.jsonl.gz' --output p.jsonl
python infer.py --model-dir runs/default --arxiv-ids 2401.12345,cs/0101001 --output preds.jsonl
python infer.py --help                                                         # every option
"""

from arxiv_ft.infer import main

if __name__ == "__main__":
    main()
