"""Contains all the data models used in inputs/outputs"""

from .ada_lora_adapter import AdaLoraAdapter
from .ada_lora_adapter_objective import AdaLoraAdapterObjective
from .artifact_list import ArtifactList
from .artifact_out import ArtifactOut
from .body_upload_file import BodyUploadFile
from .body_upload_file_purpose import BodyUploadFilePurpose
from .builtin_data import BuiltinData
from .builtin_evaluation import BuiltinEvaluation
from .delivery_attempt_out import DeliveryAttemptOut
from .field_issue import FieldIssue
from .file_data import FileData
from .file_deleted import FileDeleted
from .file_evaluation import FileEvaluation
from .file_list import FileList
from .file_out import FileOut
from .file_out_purpose import FileOutPurpose
from .health import Health
from .hf_data import HfData
from .hf_evaluation import HfEvaluation
from .job_create import JobCreate
from .job_create_allocation import JobCreateAllocation
from .job_create_loss_score import JobCreateLossScore
from .job_create_metadata import JobCreateMetadata
from .job_create_method import JobCreateMethod
from .job_create_targets import JobCreateTargets
from .job_error_out import JobErrorOut
from .job_event_list import JobEventList
from .job_event_out import JobEventOut
from .job_event_out_data_type_0 import JobEventOutDataType0
from .job_list import JobList
from .job_out import JobOut
from .job_out_metadata import JobOutMetadata
from .job_report import JobReport
from .job_report_metrics_type_0 import JobReportMetricsType0
from .job_report_params_type_0 import JobReportParamsType0
from .job_report_ranks_type_0 import JobReportRanksType0
from .job_report_samples_type_0 import JobReportSamplesType0
from .job_report_timings_s_type_0 import JobReportTimingsSType0
from .job_status import JobStatus
from .list_webhook_deliveries_status_type_0 import ListWebhookDeliveriesStatusType0
from .lora_adapter import LoraAdapter
from .lora_adapter_objective import LoraAdapterObjective
from .no_adapter import NoAdapter
from .problem import Problem
from .quality_target_in import QualityTargetIn
from .readiness import Readiness
from .readiness_checks import ReadinessChecks
from .readiness_status import ReadinessStatus
from .refine import Refine
from .stage import Stage
from .stage_out import StageOut
from .stage_out_status import StageOutStatus
from .update_adapter import UpdateAdapter
from .webhook_create import WebhookCreate
from .webhook_create_events_item import WebhookCreateEventsItem
from .webhook_created import WebhookCreated
from .webhook_created_events_item import WebhookCreatedEventsItem
from .webhook_deleted import WebhookDeleted
from .webhook_delivery_list import WebhookDeliveryList
from .webhook_delivery_out import WebhookDeliveryOut
from .webhook_delivery_out_status import WebhookDeliveryOutStatus
from .webhook_delivery_out_type import WebhookDeliveryOutType
from .webhook_list import WebhookList
from .webhook_out import WebhookOut
from .webhook_out_events_item import WebhookOutEventsItem

__all__ = (
    "AdaLoraAdapter",
    "AdaLoraAdapterObjective",
    "ArtifactList",
    "ArtifactOut",
    "BodyUploadFile",
    "BodyUploadFilePurpose",
    "BuiltinData",
    "BuiltinEvaluation",
    "DeliveryAttemptOut",
    "FieldIssue",
    "FileData",
    "FileDeleted",
    "FileEvaluation",
    "FileList",
    "FileOut",
    "FileOutPurpose",
    "Health",
    "HfData",
    "HfEvaluation",
    "JobCreate",
    "JobCreateAllocation",
    "JobCreateLossScore",
    "JobCreateMetadata",
    "JobCreateMethod",
    "JobCreateTargets",
    "JobErrorOut",
    "JobEventList",
    "JobEventOut",
    "JobEventOutDataType0",
    "JobList",
    "JobOut",
    "JobOutMetadata",
    "JobReport",
    "JobReportMetricsType0",
    "JobReportParamsType0",
    "JobReportRanksType0",
    "JobReportSamplesType0",
    "JobReportTimingsSType0",
    "JobStatus",
    "ListWebhookDeliveriesStatusType0",
    "LoraAdapter",
    "LoraAdapterObjective",
    "NoAdapter",
    "Problem",
    "QualityTargetIn",
    "Readiness",
    "ReadinessChecks",
    "ReadinessStatus",
    "Refine",
    "Stage",
    "StageOut",
    "StageOutStatus",
    "UpdateAdapter",
    "WebhookCreate",
    "WebhookCreated",
    "WebhookCreatedEventsItem",
    "WebhookCreateEventsItem",
    "WebhookDeleted",
    "WebhookDeliveryList",
    "WebhookDeliveryOut",
    "WebhookDeliveryOutStatus",
    "WebhookDeliveryOutType",
    "WebhookList",
    "WebhookOut",
    "WebhookOutEventsItem",
)
