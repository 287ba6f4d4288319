!> Coupling-overhead benchmark host: times the lodas bridge against a bare MPI exchange and a
!> file round trip of the same state, in one MPMD job. Launched by benchmarks/coupling_overhead.py:
!>
!>   mpiexec -n A bench_host FILE.nml : -n 1 python benchmarks/coupling_overhead.py --driver FILE.nml
!>
!> It uses the bridge exactly as an outside model would (lodas_init, lodas_define_decomposition,
!> lodas_put_background / lodas_get_increment, lodas_finalize). It reads
!>   &grid_nml  nx, ny, variables          the global state (nx, ny, nvar), as the driver does
!>   &bench_nml reps, warmup, polite_sync, work_dir
!> Slab decomposition: over j when ny > 1, else over i (remainders to the first ranks).
!> The packed state holds its global flat index g = ((v-1)*ny + j-1)*nx + i-1 (exact in float64).
!>
!> Every repetition runs the five variants, in an order rotated by the repetition number
!> (variant = mod(rep-1 + p-1, 5) + 1 at position p; the driver uses the same rule):
!>   1 bridge           lodas_put_background + lodas_get_increment (driver: MpiHostBridge as shipped)
!>   2 bridge_blocking  the same on the host (driver: MpiHostBridge with blocking waits)
!>   3 bare             MPI_Gatherv of the piece + MPI_Scatterv back over ctx%inter_comm
!>   4 files            write the piece raw to work_dir/bg.RANK.bin, barrier, barrier,
!>                      read work_dir/inc.RANK.bin (the driver works between the two barriers)
!>   5 bare_polled      as 3, nonblocking, each request waited for as lodas_bridge does
!>                      (MPI_Test for &bridge_nml spin_s, then 200 us naps); the driver likewise
!> Each variant starts after a barrier on the world communicator (both sides start together);
!> its time is MPI_Wtime around the exchange only. The increment (-0.5 g in warm-up repetitions,
!> 0 afterwards) is checked after the timer. Rank 0 writes work_dir/host_times.bin (float64):
!> [9, warmup + reps, errors, host ranks, times(9, warmup + reps)], times being the max over
!> host ranks: the 5 variants, then ctx%put_s and ctx%get_s of variants 1 and 2.
program bench_host
   use mpi
   use lodas_bridge
   use, intrinsic :: iso_c_binding, only: c_int
   use, intrinsic :: iso_fortran_env, only: error_unit
   implicit none

   integer, parameter :: dp = lodas_dp, NVARIANT = 5, NCOL = NVARIANT + 4
   integer, parameter :: V_BRIDGE = 1, V_BRIDGE_BLOCKING = 2, V_BARE = 3, V_FILES = 4, V_BARE_POLLED = 5

   ! &grid_nml (the keys the driver reads too)
   integer :: nx = 0, ny = 1
   character(len=LODAS_NAME_LEN) :: variables(16) = ''
   namelist /grid_nml/ nx, ny, variables
   ! &bench_nml
   integer :: reps = 100, warmup = 5
   logical :: polite_sync = .false.     !< Ibarrier + MPI_Test/usleep instead of MPI_Barrier (oversubscribed)
   character(len=512) :: work_dir = '.'
   namelist /bench_nml/ reps, warmup, polite_sync, work_dir

   interface
      function c_usleep(usec) bind(C, name='usleep') result(rc)
         import :: c_int
         integer(c_int), value :: usec
         integer(c_int) :: rc
      end function c_usleep
   end interface

   type(lodas_ctx) :: ctx
   integer :: comm, rank, nranks, ierr, status, unit, ios, nvar, v, i, j, k, p, variant, nrep
   integer :: i0, ni, j0, nj, n, req, dummy_counts(1), dummy_displs(1)
   integer :: starts(2, 16), counts(2, 16)
   real(dp), allocatable :: state(:), inc(:), expected(:), times(:, :), tmax(:, :)
   real(dp) :: t0, dummy(1), errors(1), total_errors(1)   ! reals: one buffer type for MPI_Reduce
   character(len=512) :: nml_file, iomsg, bg_file, inc_file
   character(len=LODAS_MSG_LEN) :: msg

   call MPI_Init(ierr)
   call get_command_argument(1, nml_file)
   call lodas_init(ctx, trim(nml_file), MPI_COMM_WORLD, comm, status, msg)
   if (status /= LODAS_OK) call stop_host(msg)
   call MPI_Comm_rank(comm, rank, ierr)
   call MPI_Comm_size(comm, nranks, ierr)

   open (newunit=unit, file=trim(nml_file), status='old', action='read', iostat=ios, iomsg=iomsg)
   if (ios == 0) read (unit, nml=grid_nml, iostat=ios, iomsg=iomsg)
   if (ios == 0) rewind (unit)
   if (ios == 0) read (unit, nml=bench_nml, iostat=ios, iomsg=iomsg)
   if (ios /= 0) call stop_host(trim(nml_file)//': '//trim(iomsg))
   close (unit)
   nvar = count(len_trim(variables) > 0)
   if (ny > 1) then
      call slab(ny, j0, nj)
      i0 = 0
      ni = nx
   else
      call slab(nx, i0, ni)
      j0 = 0
      nj = ny
   end if
   if (nvar < 1 .or. ni < 1 .or. nj < 1 .or. reps < 1 .or. warmup < 0) then
      write (msg, '(a,5(i0,a))') 'bench_host: bad set-up: nvar = ', nvar, ', nx = ', nx, ', ny = ', ny, &
         ' over ', nranks, ' ranks, reps = ', reps, ' (every rank needs a non-empty slab)'
      call stop_host(msg)
   end if
   do v = 1, nvar
      starts(:, v) = [i0 + 1, j0 + 1]
      counts(:, v) = [ni, nj]
   end do
   call lodas_define_decomposition(ctx, 'bench', variables(1:nvar), nx, ny, starts(:, 1:nvar), &
                                   counts(:, 1:nvar), status, msg)
   if (status /= LODAS_OK) call stop_host(msg)

   n = nvar*ni*nj
   allocate (state(n), inc(n), expected(n))
   k = 0
   do v = 1, nvar
      do j = j0 + 1, j0 + nj
         do i = i0 + 1, i0 + ni
            k = k + 1
            state(k) = real(((v - 1)*ny + j - 1), dp)*nx + (i - 1)
         end do
      end do
   end do
   write (bg_file, '(2a,i0,a)') trim(work_dir), '/bg.', rank, '.bin'
   write (inc_file, '(2a,i0,a)') trim(work_dir), '/inc.', rank, '.bin'

   nrep = warmup + reps
   allocate (times(NCOL, nrep), tmax(NCOL, nrep))
   times = 0.0_dp
   errors = 0.0_dp
   dummy_counts = 0
   dummy_displs = 0
   do k = 1, nrep
      if (k <= warmup) then
         expected = -0.5_dp*state
      else
         expected = 0.0_dp
      end if
      do p = 1, NVARIANT
         variant = mod(k - 1 + p - 1, NVARIANT) + 1
         inc = huge(1.0_dp)
         status = LODAS_OK
         call sync()
         t0 = MPI_Wtime()
         select case (variant)
         case (V_BRIDGE, V_BRIDGE_BLOCKING)
            call lodas_put_background(ctx, state, k, real(k, dp), status, msg)
            if (status == LODAS_OK) call lodas_get_increment(ctx, inc, status, msg)
         case (V_BARE)
            call MPI_Gatherv(state, n, MPI_DOUBLE_PRECISION, dummy, dummy_counts, dummy_displs, &
                             MPI_DOUBLE_PRECISION, 0, ctx%inter_comm, ierr)
            call MPI_Scatterv(dummy, dummy_counts, dummy_displs, MPI_DOUBLE_PRECISION, inc, n, &
                              MPI_DOUBLE_PRECISION, 0, ctx%inter_comm, ierr)
         case (V_BARE_POLLED)
            call MPI_Igatherv(state, n, MPI_DOUBLE_PRECISION, dummy, dummy_counts, dummy_displs, &
                              MPI_DOUBLE_PRECISION, 0, ctx%inter_comm, req, ierr)
            call poll(req)
            call MPI_Iscatterv(dummy, dummy_counts, dummy_displs, MPI_DOUBLE_PRECISION, inc, n, &
                               MPI_DOUBLE_PRECISION, 0, ctx%inter_comm, req, ierr)
            call poll(req)
         case (V_FILES)
            open (newunit=unit, file=trim(bg_file), access='stream', form='unformatted', &
                  status='replace', action='write')
            write (unit) state
            close (unit)
            call sync()    ! background written
            call sync()    ! increment written
            open (newunit=unit, file=trim(inc_file), access='stream', form='unformatted', &
                  status='old', action='read')
            read (unit) inc
            close (unit)
         end select
         times(variant, k) = MPI_Wtime() - t0
         if (variant == V_BRIDGE .or. variant == V_BRIDGE_BLOCKING) then   ! the bridge's own put / get times
            times(NVARIANT + 2*variant - 1, k) = ctx%put_s
            times(NVARIANT + 2*variant, k) = ctx%get_s
         end if
         if (status /= LODAS_OK) call lodas_fail(ctx, 'bench_host: '//msg)
         if (any(inc /= expected)) then
            errors = errors + 1.0_dp
            write (error_unit, '(a,i0,a,i0,a,i0)') 'bench_host: rank ', rank, ': wrong increment in variant ', &
               variant, ', repetition ', k
         end if
      end do
   end do

   call MPI_Reduce(times, tmax, NCOL*nrep, MPI_DOUBLE_PRECISION, MPI_MAX, 0, comm, ierr)
   call MPI_Reduce(errors, total_errors, 1, MPI_DOUBLE_PRECISION, MPI_SUM, 0, comm, ierr)
   if (rank == 0) then
      open (newunit=unit, file=trim(work_dir)//'/host_times.bin', access='stream', form='unformatted', &
            status='replace', action='write')
      write (unit) real(NCOL, dp), real(nrep, dp), total_errors, real(nranks, dp), tmax
      close (unit)
   end if
   call lodas_finalize(ctx, status, msg)
   if (status /= LODAS_OK) write (error_unit, '(2a)') 'bench_host: ', trim(msg)
   call MPI_Comm_free(comm, ierr)
   call MPI_Finalize(ierr)

contains

   !> This rank's 0-based start and extent of a slab of m points over nranks ranks.
   subroutine slab(m, start, extent)
      integer, intent(in) :: m
      integer, intent(out) :: start, extent
      extent = m/nranks
      start = rank*extent + min(rank, mod(m, nranks))
      if (rank < mod(m, nranks)) extent = extent + 1
   end subroutine slab

   !> Wait for a request the way lodas_bridge's exchange does: MPI_Test for ctx%spin_s seconds,
   !> then with 200 us naps.
   subroutine poll(request)
      integer, intent(inout) :: request
      integer :: rc
      logical :: done
      real(dp) :: t_start
      t_start = MPI_Wtime()
      do
         call MPI_Test(request, done, MPI_STATUS_IGNORE, ierr)
         if (done) exit
         if (MPI_Wtime() - t_start > ctx%spin_s) rc = c_usleep(200_c_int)
      end do
   end subroutine poll

   !> Barrier with the driver (world communicator). polite_sync: Ibarrier polled with naps, so
   !> that waiting ranks yield their core on an oversubscribed node.
   subroutine sync()
      integer :: barrier_req
      if (.not. polite_sync) then
         call MPI_Barrier(MPI_COMM_WORLD, ierr)
         return
      end if
      call MPI_Ibarrier(MPI_COMM_WORLD, barrier_req, ierr)
      call poll(barrier_req)
   end subroutine sync

   !> Stop with a message: before the handshake the driver is told (lodas_fail), after it the job aborts.
   subroutine stop_host(text)
      character(len=*), intent(in) :: text
      write (error_unit, '(2a)') 'bench_host: ', trim(text)
      flush (error_unit)
      call lodas_fail(ctx, text)
      call MPI_Finalize(ierr)
      stop 1
   end subroutine stop_host

end program bench_host
