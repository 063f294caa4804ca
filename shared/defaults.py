"""Every default in one place, each with the reason for its value.

Entry points (``python -m trainer_service``, ``python -m inference_service``, ``mnistctl``) may
override these from flags or environment variables; library code takes them as arguments.
"""

# --- Redis ---------------------------------------------------------------------------------
REDIS_URL = "redis://127.0.0.1:6379/0"  # the usual local server; compose sets its own
KEY_PREFIX = "mnist"  # every key starts with this, so one Redis can host other data too

# --- training jobs ---------------------------------------------------------------------------
LEASE_SECONDS = 15.0  # a dead worker's job is reclaimed after this; renewed every third of it
MAX_DELIVERIES = 3  # a job that failed this many deliveries goes to the dead-letter stream
PROGRESS_INTERVAL_SECONDS = 0.5  # progress writes are throttled to keep their cost under 2%
MAX_INLINE_EXAMPLES = 10_000  # inline datasets are for toys; larger data belongs in files
MAX_EPOCHS = 1_000  # a typo like 1e9 epochs is refused rather than occupying a worker forever
MAX_LAYER_WIDTH = 16_384  # keeps a job's weights well under the snapshot size cap
MAX_LAYERS = 16  # depth beyond this does not train well with plain MLPs anyway
MAX_BATCH_SIZE = 65_536  # more than the dataset adds nothing and buffers grow with it
JOB_EVENTS_MAXLEN = 10_000  # per-job progress stream is capped (approximate trim)
# A finished job's status, events, checkpoint and cancel flag expire after this (0 keeps them):
# long enough to look back over a week, short enough that Redis does not grow with every job.
JOB_RETENTION_SECONDS = 7 * 24 * 3600.0
RECONNECT_MAX_SECONDS = 10.0  # ceiling of the exponential backoff when Redis is down
MAX_JOB_BYTES = 4 * 1024 * 1024  # a job is a description plus at most a toy data set
MAX_LEARNING_RATE = 10.0  # anything larger diverges for every network this trains
CLAIM_BLOCK_SECONDS = 1.0  # an idle worker notices a shutdown request within this

# --- snapshots and the registry --------------------------------------------------------------
MAX_SNAPSHOT_BYTES = 256 * 1024 * 1024  # weights are stored in Redis; bound what one can add
RETENTION_VERSIONS = 20  # keep the last K versions of each model, plus every aliased one
MODEL_EVENTS_MAXLEN = 10_000  # the model-events stream is capped (approximate trim)

# --- inference service -----------------------------------------------------------------------
GRPC_PORT = 50051  # gRPC's customary port
METRICS_PORT = 9100  # Prometheus metrics over HTTP
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # ~5,000 float32 images per request; larger is refused
BATCHING = False  # off by default: on 2 cores it did not pay for the small net (bench_serve.py)
MAX_BATCH = 256  # dynamic batching: rows in one forward pass
MAX_QUEUE_DELAY_MS = 0.0  # adaptive batching: never wait on an empty queue (see README)
BATCH_ROWS_ALONE = 16  # requests this large amortise a pass alone; batching them only serialises
RECONCILE_SECONDS = 30.0  # safety-net reread of the registry besides the event stream
SERVER_WORKERS = 2  # request threads: fewer contend less for the GIL (README: 1-4 measured)
STREAM_WORKERS = 16  # threads for long streams (health Watch, reflection), apart from requests
STANDBY_VERSIONS = 4  # recent versions kept loaded for requests naming one (~0.5 MB each)
EVENTS_BLOCK_SECONDS = 1.0  # a blocked stream read wakes at once on events; this bounds shutdown
SHUTDOWN_GRACE_SECONDS = 10.0  # in-flight RPCs finish within this after SIGTERM (k8s allows 30)

# --- local training ---------------------------------------------------------------------------
MNIST_CLASSES = 10
MAX_IMAGE_PIXELS = 50_000_000  # a 48-megapixel phone photo is read; a decompression bomb is not
