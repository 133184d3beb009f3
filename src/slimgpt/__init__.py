"""slimgpt."""

import slimgpt.modeling  # noqa: F401  (registers the slim model types with transformers' Auto classes)
