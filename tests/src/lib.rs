//! Test harness: namespaces with a Drop guard, processes stopped by PID, bounded waits.
