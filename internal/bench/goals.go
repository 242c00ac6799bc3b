package bench

import "fmt"

// goals checks the targets against res. A target whose key was not
// measured (a smaller run) is left out.
func goals(res map[string]float64) []Goal {
	var out []Goal
	add := func(key, want string, met func(v float64) bool) {
		if v, ok := res[key]; ok {
			out = append(out, Goal{Key: key, Want: want, Got: v, Met: met(v)})
		}
	}
	add("hotpath_ratio", "≥ 0.9 × raw etcd", func(v float64) bool { return v >= 0.9 })
	put := res["hotpath_raw_put_p99_ms"]
	add("hotpath_p99_ms", fmt.Sprintf("≤ 3 × raw Put p99 (%.2f ms)", 3*put), func(v float64) bool { return v <= 3*put })
	// Issue 12: cipkg's single-host pair takes 12–23 µs here; half its rate
	// at one caller is ≤ 46 µs per pair, its rate at 64 callers ≥ 43k/s.
	add("agent_pair_p50_us_c1", "≤ 46 µs (half of cipkg's rate)", func(v float64) bool { return v <= 46 })
	add("agent_ops_per_s_c64", "≥ 43,000 pairs/s (cipkg's rate)", func(v float64) bool { return v >= 43000 })
	// Issue 19: a warm pair through a node of its own process at one
	// caller, against two bare round trips to an echo process.
	add("agent_floor_ratio_c1", "≥ 0.8 × the socket floor between processes", func(v float64) bool { return v >= 0.8 })
	add("run_agent_wall_p50_ms", "≤ 10 ms", func(v float64) bool { return v <= 10 })
	add("run_agent_etcd_revisions_per_job", "0", func(v float64) bool { return v == 0 })
	add("run_light_wall_p50_ms", "≤ 10 ms", func(v float64) bool { return v <= 10 })
	add("run_light_etcd_revisions_per_job", "0", func(v float64) bool { return v == 0 })
	add("waiters_release_p99_ms", "≤ 25 ms", func(v float64) bool { return v <= 25 })
	add("stampede_overhead_ms", "≤ 50 ms", func(v float64) bool { return v <= 50 })
	add("stampede_builds", "exactly 1", func(v float64) bool { return v == 1 })
	add("stampede_start_delta_ms", "≤ 2 ms", func(v float64) bool { return v <= 2 })
	limit := res["ttl_s"] + res["lock_delay_s"] + 1
	add("takeover_s", fmt.Sprintf("≤ TTL + lock delay + 1 s (%.0f s)", limit), func(v float64) bool { return v <= limit })
	add("prune_100k_s", "≤ 10 s", func(v float64) bool { return v <= 10 })
	add("node_rss_mb_10k_refs", "≤ 60 MB", func(v float64) bool { return v > 0 && v <= 60 })
	return out
}
