"""The generated assets are what TorchTitan 0.3.0 reads: tokenizer folder and local json dataset."""

from supervisor.titan.tinydata import DATASET, debug_model_args, make_corpus


def test_corpus_is_deterministic():
    assert make_corpus(50, seed=3) == make_corpus(50, seed=3)
    assert make_corpus(50, seed=3) != make_corpus(50, seed=4)


def test_torchtitan_reads_the_tokenizer_and_dataset(titan_assets):
    from datasets import load_dataset
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    tok = HuggingFaceTokenizer(HuggingFaceTokenizer.Config(), tokenizer_path=str(titan_assets.hf_assets_path))
    ids = tok.encode("The robot commits the weights today.", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.get_vocab_size() <= 2048  # the debug model's embedding rows
    ds = load_dataset(str(titan_assets.dataset_path), split="train")
    assert len(ds) > 100 and "text" in ds.column_names


def test_debug_model_args_are_absolute_and_parse(titan_assets, tmp_path):
    args = debug_model_args(titan_assets, "rel/dump", steps=7, checkpoint_interval=3)
    assert args[args.index("--hf_assets_path") + 1].startswith("/")
    assert args[args.index("--dataloader.dataset") + 1] == DATASET
    from supervisor.titan import cpu_compat

    cpu_compat.apply()  # TorchTitan's import chain needs it on a CPU-only machine
    from torchtitan.config import ConfigManager

    cfg = ConfigManager().parse_args(args)
    assert (cfg.training.steps, cfg.checkpoint.interval, cfg.training.seq_len) == (7, 3, 256)
    assert cfg.debug.deterministic and cfg.debug.seed == 0
