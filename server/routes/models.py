"""GET /v1/models: the one model this server answers with, in OpenAI's list shape."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.completions import ServedModel
from server.deps import ServedModelDep, require_api_key
from server.errors import APIError
from server.schemas import ModelCard, ModelList, error_responses

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)])


def model_card(model: ServedModel) -> ModelCard:
    modalities = ["text", "audio"] if model.has_audio else ["text"]
    return ModelCard(id=model.name, created=model.created, input_modalities=modalities)


@router.get("/models", response_model=ModelList, responses=error_responses(401))
async def list_models(model: ServedModelDep) -> ModelList:
    return ModelList(data=[model_card(model)])


@router.get(
    "/models/{model_id:path}", response_model=ModelCard, responses=error_responses(401, 404)
)
async def get_model(model_id: str, model: ServedModelDep) -> ModelCard:
    if model_id != model.name:
        raise APIError(404, f"the model {model_id!r} does not exist", code="model_not_found")
    return model_card(model)
