package node

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
	"github.com/granary-build/granary/internal/keys"
)

// metrics are the node's Prometheus series, on a registry of its own.
type metrics struct {
	reg *prometheus.Registry

	builds       *prometheus.CounterVec
	buildSeconds prometheus.Histogram
	waitSeconds  prometheus.Histogram
	gcSweeps     *prometheus.CounterVec
	gcRemovals   prometheus.Counter
	gcBytes      prometheus.Counter
	trashPending prometheus.Gauge
	trashErrors  prometheus.Counter
	leaseLosses  prometheus.Counter
	refsDropped  prometheus.Counter
}

// newMetrics makes the node's series and registers them, with the series
// read at scrape time (member watch counters, etcd key counts).
func newMetrics(n *Node) *metrics {
	m := newSeries()
	for _, r := range []string{"built", "failed", "cache_hit"} {
		m.builds.WithLabelValues(r)
	}
	for _, r := range []string{"ok", "busy", "error"} {
		m.gcSweeps.WithLabelValues(r)
	}
	m.registerScraped(n)
	return m
}

// newSeries makes the series the node updates, on a new registry (not yet
// registered).
func newSeries() *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.builds = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "granary_builds_total", Help: "Build attempts finished by this node's store, by result (built, failed, cache_hit).",
	}, []string{"result"})
	m.buildSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "granary_build_duration_seconds", Help: "Duration of builds this node's store ran and published.",
		Buckets: prometheus.ExponentialBuckets(0.1, 4, 10),
	})
	m.waitSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "granary_wait_duration_seconds", Help: "Time Node.Build spent waiting for another host's build.",
		Buckets: prometheus.ExponentialBuckets(0.1, 4, 10),
	})
	m.gcSweeps = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "granary_gc_sweeps_total", Help: "GC sweeps by result (ok, busy: another collector ran, error).",
	}, []string{"result"})
	m.gcRemovals = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "granary_gc_removals_total", Help: "Packages removed by this node's GC.",
	})
	m.gcBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "granary_gc_removed_bytes_total", Help: "Bytes of packages removed by this node's GC.",
	})
	m.trashPending = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "granary_trash_pending_files", Help: "Files kept in the trash at this node's last GC sweep because a process may still have them open (.nfs*, .fuse_hidden*).",
	})
	m.trashErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "granary_trash_delete_errors_total", Help: "Failures to delete from the trash in this node's GC sweeps (retried by the next sweep).",
	})
	m.leaseLosses = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "granary_lease_losses_total", Help: "Store and registration leases this node lost.",
	})
	m.refsDropped = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "granary_refs_dropped_total", Help: "Reference keys on this node's lease that it did not track (an IncRef whose outcome was lost), deleted by reconciliation.",
	})
	return m
}

// registerScraped registers m's own series and those read from n at
// scrape time: the member watch's counters and etcd's key counts.
func (m *metrics) registerScraped(n *Node) {
	count := func(kind string) func() float64 {
		return func() float64 {
			if n.cli == nil {
				return 0
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			resp, err := n.cli.Get(ctx, keys.Space{Prefix: n.cfg.Prefix}.Kind(kind), clientv3.WithPrefix(), clientv3.WithCountOnly())
			if err != nil {
				return -1
			}
			return float64(resp.Count)
		}
	}
	watched := func(c func(w *memberWatch) int64) func() float64 {
		return func() float64 {
			if n.watch == nil {
				return 0
			}
			return float64(c(n.watch))
		}
	}
	m.reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "granary_etcd_member_down_total", Help: "Times an etcd member stopped answering and the node's client closed its connections to it.",
		}, watched(func(w *memberWatch) int64 { return w.downs.Load() })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "granary_lease_keepalive_moves_total", Help: "Lease keep-alive streams reopened on another etcd member after a renewal went unanswered.",
		}, watched(func(w *memberWatch) int64 { return w.stalls.Load() })),
	)
	m.reg.MustRegister(m.builds, m.buildSeconds, m.waitSeconds, m.gcSweeps, m.gcRemovals, m.gcBytes, m.trashPending, m.trashErrors, m.leaseLosses, m.refsDropped,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "granary_refs_held", Help: "References held cluster-wide, counted in etcd at scrape time (-1: etcd unreachable).",
		}, count(keys.Ref)),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "granary_builds_in_progress", Help: "Build records (running or failed attempts) cluster-wide at scrape time.",
		}, count(keys.Build)),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "granary_packages_available", Help: "Published packages cluster-wide at scrape time.",
		}, count(keys.Avail)),
	)
}

// registerCache adds the remote cache's counters, read at scrape time.
func (m *metrics) registerCache(c *cache.Remote) {
	counter := func(name, help string, get func(cache.Stats) int64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help},
			func() float64 { return float64(get(c.Stats())) })
	}
	bytes := func(dir string, get func(cache.Stats) int64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "granary_cache_bytes_total", Help: "Bytes moved to (up) or from (down) the remote cache by this node's store.",
			ConstLabels: prometheus.Labels{"direction": dir},
		}, func() float64 { return float64(get(c.Stats())) })
	}
	m.reg.MustRegister(
		counter("granary_cache_hits_total", "Packages this node's store got from the remote cache instead of building.",
			func(s cache.Stats) int64 { return s.Hits }),
		counter("granary_cache_misses_total", "Remote cache lookups that found no entry.",
			func(s cache.Stats) int64 { return s.Misses }),
		counter("granary_cache_fetch_errors_total", "Remote cache fetches that failed (network, corrupt or unsafe archive, digest mismatch); the package was built instead.",
			func(s cache.Stats) int64 { return s.FetchErrors }),
		counter("granary_cache_uploads_total", "Packages uploaded to the remote cache.",
			func(s cache.Stats) int64 { return s.Uploads }),
		counter("granary_cache_upload_failures_total", "Uploads to the remote cache that failed (the builds succeeded).",
			func(s cache.Stats) int64 { return s.UploadFailures }),
		counter("granary_cache_fetch_budget_spent_total", "Remote cache fetches given up because they took longer than the fetch budget; the package was built instead.",
			func(s cache.Stats) int64 { return s.BudgetSpent }),
		bytes("down", func(s cache.Stats) int64 { return s.BytesDown }),
		bytes("up", func(s cache.Stats) int64 { return s.BytesUp }),
	)
	for _, reason := range cache.Reasons {
		m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name:        "granary_cache_rejected_total",
			Help:        "Remote cache entries refused by the signature checks (--cache-trusted-keys), by reason; the package was built instead.",
			ConstLabels: prometheus.Labels{"reason": string(reason)},
		}, func() float64 { return float64(c.Stats().Rejected[reason]) }))
	}
}

// event is the store's WithEvents hook: it must not block.
func (m *metrics) event(e etcdstore.Event) {
	switch e.Kind {
	case etcdstore.EventPublished:
		m.builds.WithLabelValues("built").Inc()
		m.buildSeconds.Observe(e.Elapsed.Seconds())
	case etcdstore.EventFailed:
		m.builds.WithLabelValues("failed").Inc()
	case etcdstore.EventCacheHit:
		m.builds.WithLabelValues("cache_hit").Inc()
	case etcdstore.EventLeaseLost:
		m.leaseLosses.Inc()
	case etcdstore.EventRefDropped:
		m.refsDropped.Inc()
	}
}

// built observes a Node.Build call's outcome: how long it waited on
// another host, if it did.
func (m *metrics) built(out etcdstore.Outcome) {
	if out.How == etcdstore.Waited {
		m.waitSeconds.Observe(out.Waited.Seconds())
	}
}

func (m *metrics) sweep(rep etcdstore.PruneReport, err error) {
	switch {
	case errors.Is(err, etcdstore.ErrCollectorBusy):
		m.gcSweeps.WithLabelValues("busy").Inc()
		return
	case err != nil:
		m.gcSweeps.WithLabelValues("error").Inc()
	default:
		m.gcSweeps.WithLabelValues("ok").Inc()
	}
	if !rep.DryRun {
		m.gcRemovals.Add(float64(len(rep.Removed)))
		m.gcBytes.Add(float64(rep.FreedBytes))
		m.trashErrors.Add(float64(len(rep.TrashErrors)))
		if err == nil {
			m.trashPending.Set(float64(rep.TrashPending))
		}
	}
}

// handler serves /metrics, /healthz (the process runs) and /readyz (etcd
// answers and the store holds a lease).
func (n *Node) handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(n.m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(r.Context()), 2*time.Second)
		defer cancel()
		if _, err := n.cli.Get(ctx, keys.Space{Prefix: n.cfg.Prefix}.HealthKey(), clientv3.WithCountOnly()); err != nil {
			http.Error(w, "etcd: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		if n.store.Lease() == 0 {
			http.Error(w, "no store lease (being re-established)", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	return mux
}
