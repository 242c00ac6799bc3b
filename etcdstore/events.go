package etcdstore

import "time"

// EventKind says what an Event reports.
type EventKind int

// Event kinds.
const (
	// EventWaiting: another host's attempt holds the build lock. Host, PID,
	// Since and LogDir name it. Sent when the wait starts and whenever the
	// attempt changes.
	EventWaiting EventKind = iota + 1
	// EventLockDelay: an earlier attempt did not end cleanly (it died, or
	// its host lost its lease) and left its output directory; waiting
	// Elapsed before its leftovers are moved aside.
	EventLockDelay
	// EventBuilding: this store holds the lock and runs the builder.
	EventBuilding
	// EventCacheHit: the package came from the remote cache.
	EventCacheHit
	// EventPublished: the package is available (Size, Digest, Elapsed).
	EventPublished
	// EventFailed: an attempt failed (Err; Host and LogDir of the attempt).
	EventFailed
	// EventRemoved: TryRemove or Prune removed the package.
	EventRemoved
	// EventLeaseLost: the store's lease is in doubt or gone (Err says why);
	// builds were cancelled and references are being taken again.
	EventLeaseLost
	// EventLeaseRestored: a new lease is in place.
	EventLeaseRestored
	// EventRefLost: a reference could not be taken again after a lease loss
	// because the package is gone. Whoever used it should stop.
	EventRefLost
	// EventCacheUploadFailed: uploading a published package to the remote
	// cache failed (Err). The build itself succeeded.
	EventCacheUploadFailed
	// EventCacheStored: a published package was uploaded to the remote
	// cache (Elapsed: how long the upload took).
	EventCacheStored
	// EventCacheMiss: the remote cache did not provide the package, so the
	// builder runs. Err is nil for a plain miss, else why the fetch failed.
	EventCacheMiss
	// EventLastFailed: the previous attempt failed cleanly (Host, PID,
	// LogDir and Err name it); this store starts a new attempt.
	EventLastFailed
	// EventWaitVisible: etcd says the package is published, but this host
	// cannot see its tree yet (Err says what is missing; Host, PID and
	// Since name the publisher; Elapsed is how long it will wait at most).
	// A stale cache of the shared root: see "Running on NFS".
	EventWaitVisible
	// EventTrashFailed: deleting a tree in the trash failed (Err); the
	// next sweep tries again.
	EventTrashFailed
	// EventTrashPending: a trash entry is kept because it holds files of
	// a deleted file still open somewhere (.nfs*, .fuse_hidden*); Size is
	// how many. It goes when they are closed, or when they are old.
	EventTrashPending
	// EventMountWarning: the shared root is mounted with options that
	// make this host's view of it stale or unsafe (Err says which).
	EventMountWarning
	// EventSealing: the builder returned and the store is sealing the tree
	// (making it read-only and computing its digest). Sent once a second
	// while that lasts more than a second, with Files and Size done so far
	// and Elapsed since sealing began; a last one with Done set when it
	// ends.
	EventSealing
	// EventYieldRequested: a removal on host Host asks the owners of
	// cached references to ID (IncRefCachedContext) to release them if no
	// job holds the package, and to answer with RecordHolders (a count
	// above zero refuses at once) if jobs do. Sent only to stores that
	// took a cached reference.
	EventYieldRequested
	// EventHoldersRequested: AskHolders on host Host wants the number of
	// local users of the cached reference to ID; its owner answers with
	// RecordHolders. Sent only to stores that took a cached reference.
	EventHoldersRequested
	// EventRefDropped: ReconcileRefs deleted a reference key to ID on the
	// store's lease that the store did not track (an IncRef whose outcome
	// was lost, applied after its caller gave up). Without the drop it
	// would have pinned the package until the lease ended.
	EventRefDropped
	// EventRefDeleted: etcd deleted the key of a cached reference to ID
	// behind the store's back (its lease revoked or expired, or the key
	// deleted; Err says how it was found). The reference is no longer
	// proven (RefProven); the store takes it again at once, or reports
	// EventRefLost if the package was removed meanwhile.
	EventRefDeleted
	// EventWaitRoot: etcd says the prefix has a shared root, but this host
	// cannot see it (or its binding) yet, so New looks again before it
	// refuses the root (Err says what is missing; Host and Since name who
	// bound the root and when; Elapsed is how long it will wait at most).
	// A stale cache of the shared root, or a volume that is not mounted.
	EventWaitRoot
	// EventInvalidated: this store invalidated the package (Err: the
	// reason).
	EventInvalidated
	// EventWaitInvalid: a build waits for the removal of an invalidated
	// package before it builds it anew (Err: the invalidation).
	EventWaitInvalid
	// EventRefInvalid: a package this store holds a cached reference on was
	// invalidated (Err says by whom and why): no new holder may be granted
	// it from the cache.
	EventRefInvalid
)

var kindNames = map[EventKind]string{
	EventWaiting: "waiting", EventLockDelay: "lock-delay", EventBuilding: "building",
	EventCacheHit: "cache-hit", EventPublished: "published", EventFailed: "failed",
	EventRemoved: "removed", EventLeaseLost: "lease-lost", EventLeaseRestored: "lease-restored",
	EventRefLost: "ref-lost", EventCacheUploadFailed: "cache-upload-failed", EventCacheStored: "cache-stored",
	EventCacheMiss: "cache-miss", EventLastFailed: "last-failed", EventSealing: "sealing", EventWaitVisible: "wait-visible",
	EventTrashFailed: "trash-failed", EventTrashPending: "trash-pending", EventMountWarning: "mount-warning",
	EventYieldRequested: "yield-requested", EventHoldersRequested: "holders-requested", EventRefDropped: "ref-dropped", EventRefDeleted: "ref-deleted",
	EventWaitRoot: "wait-root", EventInvalidated: "invalidated", EventWaitInvalid: "wait-invalid", EventRefInvalid: "ref-invalid",
}

func (k EventKind) String() string {
	if s, ok := kindNames[k]; ok {
		return s
	}
	return "unknown"
}

// Event is one step of progress, sent to the WithEvents hook.
type Event struct {
	Kind    EventKind
	ID      string    // package; empty for lease events
	Time    time.Time // when the event happened
	Host    string    // host of the attempt or holder concerned
	PID     int
	Since   time.Time     // when the attempt started
	LogDir  string        // logs of the attempt
	Elapsed time.Duration // build time, or the lock delay
	Size    int64
	Files   int64 // files sealed so far (EventSealing)
	Done    bool  // the last EventSealing of a tree
	Digest  string
	Err     error
}

func (s *Store) emit(e Event) {
	if s.opt.events == nil {
		return
	}
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	s.opt.events(e)
}
