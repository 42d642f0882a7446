"""Fine-tune a causal LM to classify arXiv papers by primary category (see arxiv_ft/train.py for the whole story).

accelerate launch --config_file accelerate_configs/single.yaml train.py       # the default run (README)
accelerate launch train.py --method full --learning_rate 2e-5 --output_dir runs/full
python train.py --config presets/compare/lora.yaml --seed 1 --output-dir runs/lora-s1
python train.py --help                                                         # every option
"""

from arxiv_ft.train import main

if __name__ == "__main__":
    main()
