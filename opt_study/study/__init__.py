"""The driver: a validated spec becomes a Ray Tune run (`run`), trials are launched in-process or
as a Ray Train worker group (`launch`), recorded as they end (`recorder`), raced per optimizer
(`asha`) and, under TPE, proposed online (`tpe_search`)."""
