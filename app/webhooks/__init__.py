"""Webhooks: a task's final record POSTed to its `notify_url`, signed. This docstring is the map.

- **Submit.** A submission may name a `notify_url` (`TaskCreate`). Its form is checked by the
  schema and its address by the route (`service.check_notify_url`, a DNS lookup off the event
  loop): http or https, resolving only to public addresses unless
  TASKDOCK_WEBHOOK_ALLOWED_NETWORKS lists the network (`guard`); else 422 naming `notify_url`.
  It is stored on the task (`task.notify_url`); nothing else changes on the submit path.
- **The delivery outbox.** The dispatcher's webhook thread (`delivery.WebhookSender`,
  started by `Dispatcher.run_forever`) finds final tasks with a notify_url and no delivery
  yet (`notified_at` null; the partial index ix_task_notify) and makes a `webhook_delivery`
  row (`models`) with the body fixed then. The worker's claim and finish are untouched:
  ending a task writes nothing more. A task retried through the API gets `notified_at`
  cleared, so its next end owes a new delivery (one per task attempt).
- **Sending** (`delivery`): due deliveries are claimed (FOR UPDATE SKIP LOCKED on PostgreSQL,
  and leased ahead before the POST), the address is resolved and checked again and the POST
  pinned to it (no DNS rebinding), with short timeouts and no redirects, and signed per the
  Standard Webhooks spec (`signing`: `webhook-id` stable across retries, `webhook-timestamp`,
  `webhook-signature`). A 2xx is delivered; anything else is tried again with exponential
  backoff and jitter until TASKDOCK_WEBHOOK_RETRY_WINDOW_SECONDS have passed, then failed.
  Only 200 bytes of an answer are read and at most 300 kept (`last_error`).
- **Secrets** (`signing`): derived per API key from TASKDOCK_WEBHOOK_SECRET, so nothing is
  stored; shown once by `taskdock keys create`, again by `taskdock keys webhook-secret`.
- **Reading** (`router`, `service.list_deliveries`): GET /api/v1/tasks/{id}/deliveries,
  scoped to the key's owner like every task route; the API's /metrics reports
  taskdock_webhook_deliveries{status} from the record (`metrics`).
"""
