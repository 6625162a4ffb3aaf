from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..models.webhook_out_events_item import WebhookOutEventsItem
from ..types import UNSET, Unset

T = TypeVar("T", bound="WebhookOut")


@_attrs_define
class WebhookOut:
    """
    Attributes:
        id (str):
        url (str):
        events (list[WebhookOutEventsItem]):
        description (str):
        created_at (datetime.datetime):
        object_ (Literal['webhook'] | Unset):  Default: 'webhook'.
    """

    id: str
    url: str
    events: list[WebhookOutEventsItem]
    description: str
    created_at: datetime.datetime
    object_: Literal["webhook"] | Unset = "webhook"
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        id = self.id

        url = self.url

        events = []
        for events_item_data in self.events:
            events_item = events_item_data.value
            events.append(events_item)

        description = self.description

        created_at = self.created_at.isoformat()

        object_ = self.object_

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "id": id,
                "url": url,
                "events": events,
                "description": description,
                "created_at": created_at,
            }
        )
        if object_ is not UNSET:
            field_dict["object"] = object_

        return field_dict

    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        id = d.pop("id")

        url = d.pop("url")

        events = []
        _events = d.pop("events")
        for events_item_data in _events:
            events_item = WebhookOutEventsItem(events_item_data)

            events.append(events_item)

        description = d.pop("description")

        created_at = datetime.datetime.fromisoformat(d.pop("created_at"))

        object_ = cast(Literal["webhook"] | Unset, d.pop("object", UNSET))
        if object_ != "webhook" and not isinstance(object_, Unset):
            raise ValueError(f"object must match const 'webhook', got '{object_}'")

        webhook_out = cls(
            id=id,
            url=url,
            events=events,
            description=description,
            created_at=created_at,
            object_=object_,
        )

        webhook_out.additional_properties = d
        return webhook_out

    @property
    def additional_keys(self) -> list[str]:
        return list(self.additional_properties.keys())

    def __getitem__(self, key: str) -> Any:
        return self.additional_properties[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.additional_properties[key] = value

    def __delitem__(self, key: str) -> None:
        del self.additional_properties[key]

    def __contains__(self, key: str) -> bool:
        return key in self.additional_properties
