package bench_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"testing"

	"go.etcd.io/etcd/client/pkg/v3/testutil"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/internal/bench"
	"github.com/granary-build/granary/internal/etcdtest"
)

// childEnv holds the JSON arguments of a child process (this test binary
// re-executed) that runs bench.ChildMain against $BENCH_ENDPOINT.
const childEnv = "GRANARY_BENCH_TEST_CHILD"

func TestMain(m *testing.M) {
	if a := os.Getenv(childEnv); a != "" {
		os.Exit(childMain(a))
	}
	testutil.MustTestMainWithLeakDetection(m)
}

func childMain(argsJSON string) int {
	var args []string
	if err := json.Unmarshal([]byte(argsJSON), &args); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	var cli *clientv3.Client
	if bench.ChildNeedsEtcd(args) {
		var err error
		if cli, err = clientv3.New(etcdtest.ClientConfig(os.Getenv("BENCH_ENDPOINT"))); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer cli.Close()
	}
	if err := bench.ChildMain(context.Background(), args, cli, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}
