"""speechchat training: corpus text, speech synthesis and corpus import (steps 1-3), then the
later steps (responses, CTC pretraining, alignment, evaluation). Manifests are the common format."""
