"""The dataset layer: recipes (`p2pcold/recipes/*.yaml`) to labelled splits, tokenized splits and loaders.

It depends on nothing in p2pcold beyond `config` and `utils`, and never on hivemind.
"""

from p2pcold.data.examples import load_examples
from p2pcold.data.prepare import PreparedDataset, few_shot, make_loader, prepare_dataset

__all__ = ["PreparedDataset", "few_shot", "load_examples", "make_loader", "prepare_dataset"]
