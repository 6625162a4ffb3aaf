"""The API's choice lists are core's: the method registry and the config's own choices."""
from svdforge.api.schemas import JobCreate
from svdforge.core.config import ALLOCATIONS, OBJECTIVES, TARGET_PRESETS
from svdforge.core.methods import method_names


def test_the_schema_lists_the_registry_and_the_configs_choices():
    props = JobCreate.model_json_schema()["properties"]
    assert tuple(props["method"]["enum"]) == method_names()
    assert tuple(props["allocation"]["enum"]) == ALLOCATIONS
    assert tuple(props["targets"]["enum"]) == TARGET_PRESETS
    lora = JobCreate.model_validate({"model": "m", "ratio": 0.4, "adapter": {"type": "lora"}}).adapter
    assert lora.objective in OBJECTIVES
