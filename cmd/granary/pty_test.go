package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"unicode/utf8"

	"github.com/rogpeppe/go-internal/testscript"
	"golang.org/x/sys/unix"
)

// ptyEnv are the script variables a command run on a terminal gets.
var ptyEnv = []string{"PATH", "HOME", "WORK", "TMPDIR", "GRANARY_ENDPOINTS", "GRANARY_ROOT", "GRANARY_HOST",
	"GRANARY_IDLE_TIMEOUT", "XDG_DATA_HOME", "XDG_STATE_HOME"}

// ptyrun COLS FILE PROG ARGS... runs PROG with stdin, stdout and stderr on
// a pseudo-terminal COLS wide (opened through /dev/ptmx, no dependency) and
// writes everything the terminal received to FILE. PROG must succeed.
func cmdPtyrun(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 3 {
		ts.Fatalf("usage: ptyrun COLS FILE PROG [ARGS...]")
	}
	cols, err := strconv.Atoi(args[0])
	ts.Check(err)
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		ts.Fatalf("no pseudo-terminals here: %v", err)
	}
	defer m.Close()
	ts.Check(unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0))
	n, err := unix.IoctlGetUint32(int(m.Fd()), unix.TIOCGPTN)
	ts.Check(err)
	tty, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	ts.Check(err)
	ts.Check(unix.IoctlSetWinsize(int(tty.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: 24, Col: uint16(cols)}))

	cmd := exec.Command(args[2], args[3:]...)
	// Find PROG in the script's PATH (where testscript put granary), not
	// the test process's.
	for _, dir := range strings.Split(ts.Getenv("PATH"), ":") {
		if st, err := os.Stat(dir + "/" + args[2]); err == nil && st.Mode().IsRegular() && !strings.Contains(args[2], "/") {
			cmd.Path = dir + "/" + args[2]
			break
		}
	}
	for _, k := range ptyEnv {
		cmd.Env = append(cmd.Env, k+"="+ts.Getenv(k))
	}
	cmd.Dir = ts.MkAbs(".")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
	out := make(chan []byte, 1)
	go func() {
		var b bytes.Buffer
		io.Copy(&b, m) // ends with EIO when the last holder of the tty closes it
		out <- b.Bytes()
	}()
	runErr := cmd.Run()
	tty.Close()
	got := <-out
	ts.Check(os.WriteFile(ts.MkAbs(args[1]), got, 0o644))
	if runErr != nil {
		ts.Fatalf("%s on a terminal: %v\n%s", args[2], runErr, got)
	}
}

// nowrap COLS FILE replays FILE (what a terminal received) on a terminal
// COLS wide and fails if a status line (one rewritten in place: \r ESC[K)
// wrapped, which would leave a stale copy on the screen at each rewrite.
// Plain messages may wrap. It logs the screen it ends with.
func cmdNowrap(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 2 {
		ts.Fatalf("usage: nowrap COLS FILE")
	}
	cols, err := strconv.Atoi(args[0])
	ts.Check(err)
	out := strings.ReplaceAll(ts.ReadFile(args[1]), "\r\n", "\n") // the terminal's ONLCR
	var lines []string
	var cur []rune
	col, wraps, inPlace := 0, 0, 0
	status := false // the current line is rewritten in place
	for i := 0; i < len(out); {
		switch {
		case strings.HasPrefix(out[i:], "\033[K"):
			cur = cur[:min(col, len(cur))]
			inPlace++
			status = true
			i += 3
			continue
		case out[i] == '\r':
			col = 0
		case out[i] == '\n':
			lines, cur, col, status = append(lines, string(cur)), nil, 0, false
		default:
			r, n := utf8.DecodeRuneInString(out[i:])
			if col == cols {
				if status {
					wraps++
				}
				lines, cur, col = append(lines, string(cur)), nil, 0
			}
			if col < len(cur) {
				cur[col] = r
			} else {
				cur = append(cur, r)
			}
			col++
			i += n
			continue
		}
		i++
	}
	if len(cur) > 0 {
		lines = append(lines, string(cur))
	}
	ts.Logf("screen (%d in-place rewrites):\n%s", inPlace, strings.Join(lines, "\n"))
	if wraps > 0 {
		ts.Fatalf("%d status line(s) wrapped at %d columns", wraps, cols)
	}
}
