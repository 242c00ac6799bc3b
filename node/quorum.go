package node

import (
	"context"
	"fmt"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// quorumLoss asks each endpoint for its status (each within a second) and,
// if some member answered without knowing a leader and none knows one,
// describes it: which member answered, which did not. It returns "" when
// the cause is something else (a leader is known, or nobody answered).
func quorumLoss(ctx context.Context, cli *clientv3.Client, eps []string) string {
	var answered, silent []string
	for _, ep := range eps {
		sctx, cancel := context.WithTimeout(ctx, time.Second)
		st, err := cli.Status(sctx, ep)
		cancel()
		switch {
		case err != nil:
			silent = append(silent, ep)
		case st.Leader != 0:
			return "" // a leader exists: not a quorum loss
		default:
			answered = append(answered, fmt.Sprintf("%s (member %x, raft term %d)", ep, st.Header.MemberId, st.RaftTerm))
		}
	}
	if len(answered) == 0 {
		return ""
	}
	msg := "answered without a leader: " + strings.Join(answered, ", ")
	if len(silent) > 0 {
		msg += "; no answer from " + strings.Join(silent, ", ")
	}
	return msg + " (a majority of the members must be up; bring the others back)"
}
