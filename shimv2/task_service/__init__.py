"""containerd's Task API (v2, v3) mapped onto the virtcontainers API."""

from shimv2.task_service.service import Publisher as Publisher
from shimv2.task_service.service import Shutdown as Shutdown
from shimv2.task_service.service import TaskService as TaskService
from shimv2.task_service.service import VirtContainers as VirtContainers
